"""`keel-pdp policy check | diff | explain`: the bundle tools for CI and people.

``diff`` speaks to a finance owner (caps, prices, routes, exception paths in
words); ``explain`` shows which budgets, prices and routing rules apply to one
request, and why.
"""

from __future__ import annotations

import argparse
import sys
import time
from decimal import Decimal
from typing import Any

from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.policy.snapshot import (
    DIMENSIONS,
    CompiledBudget,
    CompiledRoute,
    ExceptionRule,
    ModelPrice,
    PolicySnapshot,
)
from keel_pdp.pricing import Price, format_call_fee, format_pico_price, format_usd

# Other command modules may add sub-commands under `policy` (e.g. replay).
POLICY_SUBPARSERS: list[Any] = []

_PER = {"hourly": "per hour", "daily": "per day", "monthly": "per month"}


usd = format_usd


def _pct(old: int, new: int) -> str:
    if old == 0:
        return ""
    change = (Decimal(new - old) * 100 / Decimal(old)).quantize(Decimal("0.1"))
    return f" ({'+' if change > 0 else ''}{change}%)"


def _load(directory: str) -> PolicySnapshot | None:
    try:
        return load_bundle(directory)
    except PolicyError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{directory}: rejected ({len(exc.problems)} problem(s))", file=sys.stderr)
        return None


def check(ns: argparse.Namespace) -> int:
    snap = _load(ns.directory)
    if snap is None:
        return 1
    print(f"{ns.directory}: ok, revision {snap.policy_revision}, prices {snap.price_revision}, "
          f"{len(snap.budgets)} budgets, {len(snap.prices)} priced models, "
          f"{len(snap.routes)} routing rules, {len(snap.exception_paths)} exception paths"
          + (f", {len(snap.deployments)} mapped deployments" if snap.deployments else ""))
    for warning in snap.warnings:
        print(f"warning: {warning}")
    return 0


# ------------------------------------------------------------------- diff
def _budget_words(b: CompiledBudget) -> str:
    mode = "enforced" if b.enforce else "observed only"
    text = f"{usd(b.limit_micros)} {_PER[b.window]} on {b.scope_text}, {mode}, fails " \
           f"{'open' if b.fail_open else 'closed'}"
    if b.exception_path:
        text += f", exceptions via {b.exception_path}"
    return text


def _fee_words(fee: int | None) -> str:
    return ("no web search fee" if fee is None
            else f"{format_call_fee(fee)} USD per 1,000 web search calls")


def _price_words(p: Price) -> str:
    words = (f"input {format_pico_price(p.input)}, cached input "
             f"{format_pico_price(p.cached_input)}, cache write "
             f"{format_pico_price(p.cache_write)}, output {format_pico_price(p.output)} USD "
             "per 1M tokens")
    return words if p.web_search is None else f"{words}; {_fee_words(p.web_search)}"


def diff_snapshots(old: PolicySnapshot, new: PolicySnapshot) -> list[str]:
    lines: list[str] = []
    ob = {b.id: b for b in old.budgets}
    nb = {b.id: b for b in new.budgets}
    for bid in sorted(ob.keys() - nb.keys()):
        lines.append(f"Budget {bid} removed (was {_budget_words(ob[bid])}).")
    for bid in sorted(nb.keys() - ob.keys()):
        lines.append(f"Budget {bid} added: {_budget_words(nb[bid])}.")
    for bid in sorted(ob.keys() & nb.keys()):
        a, b = ob[bid], nb[bid]
        if a.limit_micros != b.limit_micros:
            verb = "raised" if b.limit_micros > a.limit_micros else "lowered"
            lines.append(f"Budget {bid}: cap {verb} from {usd(a.limit_micros)} to "
                         f"{usd(b.limit_micros)} {_PER[b.window]}"
                         f"{_pct(a.limit_micros, b.limit_micros)}.")
        if a.window != b.window:
            lines.append(f"Budget {bid}: window changed from {a.window} to {b.window}; "
                         "spend booked in the old windows is not carried over (only a new "
                         "window that starts at the same instant as an old one shares its "
                         "figures); a new budget id starts a clean count.")
        if a.enforce != b.enforce:
            lines.append(f"Budget {bid}: now {'enforced' if b.enforce else 'observed only'} "
                         f"(was {'enforced' if a.enforce else 'observed only'}).")
        if a.fail_open != b.fail_open:
            lines.append(f"Budget {bid}: now fails {'open' if b.fail_open else 'closed'} when "
                         "the budget store is unavailable.")
        if a.scope_text != b.scope_text:
            lines.append(f"Budget {bid}: scope changed from {a.scope_text} to {b.scope_text}.")
        if a.exception_path != b.exception_path:
            lines.append(f"Budget {bid}: exception path changed from "
                         f"{a.exception_path or '(none)'} to {b.exception_path or '(none)'}.")
        if a.thresholds != b.thresholds:
            lines.append(f"Budget {bid}: alert thresholds changed from "
                         f"{list(a.thresholds)}% to {list(b.thresholds)}%.")
        if a.timezone != b.timezone:
            lines.append(f"Budget {bid}: timezone changed from {a.timezone} to {b.timezone}.")
    lines.extend(_diff_prices(old, new))
    lines.extend(_diff_routes(old, new))
    lines.extend(_diff_exceptions(old.exception_paths, new.exception_paths))
    from keel_pdp.policy.callers import diff_lines as caller_diff

    lines.extend(caller_diff(old.callers, new.callers))
    from keel_pdp.policy.deployments import diff_lines as deployment_diff

    lines.extend(deployment_diff(old.deployments, new.deployments))
    if old.settings != new.settings:
        for name in old.settings.__slots__:
            a_, b_ = getattr(old.settings, name), getattr(new.settings, name)
            if a_ != b_ and name != "fallback_price":
                lines.append(f"Setting {name} changed from {a_} to {b_}.")
        if old.settings.fallback_price != new.settings.fallback_price:
            lines.append("The fallback price for unpriced models changed.")
    return lines


def _diff_prices(old: PolicySnapshot, new: PolicySnapshot) -> list[str]:
    lines = []
    for key in sorted(old.prices.keys() - new.prices.keys()):
        lines.append(f"Price of {key[0]}/{key[1]} removed: requests for it will be denied "
                     "UNKNOWN_MODEL_PRICE unless a fallback price is set.")
    for key in sorted(new.prices.keys() - old.prices.keys()):
        words = _price_words(new.prices[key][-1].price)
        lines.append(f"Price of {key[0]}/{key[1]} added: {words}.")
    for key in sorted(old.prices.keys() & new.prices.keys()):
        a: tuple[ModelPrice, ...] = old.prices[key]
        b: tuple[ModelPrice, ...] = new.prices[key]
        if a == b:
            continue
        pa, pb_ = a[-1].price, b[-1].price
        name = f"{key[0]}/{key[1]}"
        for field in ("input", "cached_input", "cache_write", "cache_write_1h", "output"):
            x, y = getattr(pa, field), getattr(pb_, field)
            if x != y:
                lines.append(f"Price of {name}: {field.replace('_', ' ')} from "
                             f"{format_pico_price(x)} to {format_pico_price(y)} USD per 1M "
                             f"tokens{_pct(x, y)}.")
        if pa.web_search != pb_.web_search:
            lines.append(f"Price of {name}: web search from {_fee_words(pa.web_search)} to "
                         f"{_fee_words(pb_.web_search)}.")
        if len(a) != len(b) or [m.effective_from_ms for m in a] != [
                m.effective_from_ms for m in b]:
            dates = [time.strftime("%Y-%m-%d", time.gmtime(m.effective_from_ms / 1000))
                     for m in b if m.effective_from_ms]
            lines.append(f"Price of {name}: price history now has {len(b)} entries"
                         + (f" (effective {', '.join(dates)})." if dates else "."))
        if a[-1].tiers != b[-1].tiers:
            lines.append(f"Price of {name}: context-length tiers changed.")
        lines.extend(_diff_service_tiers(name, a[-1], b[-1]))
        if a[-1].max_output_tokens != b[-1].max_output_tokens:
            lines.append(f"Price of {name}: default max output tokens from "
                         f"{a[-1].max_output_tokens} to {b[-1].max_output_tokens}.")
    return lines


def _diff_service_tiers(name: str, a: ModelPrice, b: ModelPrice) -> list[str]:
    lines = []
    old, new = dict(a.service_tiers), dict(b.service_tiers)
    for tier in sorted(old.keys() - new.keys()):
        lines.append(f"Price of {name}: service tier {tier} removed: calls at it are priced "
                     "at the highest rate the model has and flagged SERVICE_TIER_UNPRICED.")
    for tier in sorted(new.keys() - old.keys()):
        lines.append(f"Price of {name}: service tier {tier} added: "
                     f"{_price_words(new[tier].price)}.")
    for tier in sorted(old.keys() & new.keys()):
        x, y = old[tier], new[tier]
        for field in ("input", "cached_input", "cache_write", "cache_write_1h", "output"):
            u, v = getattr(x.price, field), getattr(y.price, field)
            if u != v:
                lines.append(f"Price of {name}, service tier {tier}: {field.replace('_', ' ')} "
                             f"from {format_pico_price(u)} to {format_pico_price(v)} USD per "
                             f"1M tokens{_pct(u, v)}.")
        if x.tiers != y.tiers:
            lines.append(f"Price of {name}, service tier {tier}: context-length tiers "
                         "changed.")
    return lines


def _route_words(r: CompiledRoute) -> str:
    allowed = ", ".join(sorted(f"{p}/{m}" for p, m in r.allowed)) or "any priced model"
    chain = " -> ".join(f"{p}/{m}" for p, m in r.chain)
    return (f"{r.mode} for tenant={r.scope[0]} workload={r.scope[1]}, allows {allowed}"
            + (f", downgrade chain {chain}" if chain else ""))


def _diff_routes(old: PolicySnapshot, new: PolicySnapshot) -> list[str]:
    lines = []
    orr = {r.id: r for r in old.routes}
    nr = {r.id: r for r in new.routes}
    for rid in sorted(orr.keys() - nr.keys()):
        lines.append(f"Routing rule {rid} removed (was {_route_words(orr[rid])}).")
    for rid in sorted(nr.keys() - orr.keys()):
        lines.append(f"Routing rule {rid} added: {_route_words(nr[rid])}.")
    for rid in sorted(orr.keys() & nr.keys()):
        a, b = orr[rid], nr[rid]
        if a.allowed != b.allowed:
            gone = sorted(f"{p}/{m}" for p, m in a.allowed - b.allowed)
            added = sorted(f"{p}/{m}" for p, m in b.allowed - a.allowed)
            parts = ([f"now allows {', '.join(added)}"] if added else []) + (
                [f"no longer allows {', '.join(gone)}"] if gone else [])
            lines.append(f"Routing rule {rid}: {'; '.join(parts)}.")
        if a.mode != b.mode:
            lines.append(f"Routing rule {rid}: mode changed from {a.mode} to {b.mode}.")
        if a.chain != b.chain:
            lines.append(f"Routing rule {rid}: downgrade chain is now "
                         f"{' -> '.join(f'{p}/{m}' for p, m in b.chain) or '(none)'}.")
        if a.scope != b.scope:
            lines.append(f"Routing rule {rid}: now applies to tenant={b.scope[0]} "
                         f"workload={b.scope[1]}.")
    return lines


def _diff_exceptions(old: dict[str, ExceptionRule], new: dict[str, ExceptionRule]) -> list[str]:
    lines = []
    for name in sorted(old.keys() - new.keys()):
        lines.append(f"Exception path {name} removed.")
    for name in sorted(new.keys() - old.keys()):
        e = new[name]
        lines.append(f"Exception path {name} added: approved by {e.approver_role}, at most "
                     f"{usd(e.max_overage_micros)} for {e.max_duration_seconds // 3600} hours.")
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a.approver_role != b.approver_role:
            lines.append(f"Exception path {name}: approver role from {a.approver_role} to "
                         f"{b.approver_role}.")
        if a.max_overage_micros != b.max_overage_micros:
            lines.append(f"Exception path {name}: maximum overage from "
                         f"{usd(a.max_overage_micros)} to {usd(b.max_overage_micros)}.")
        if a.max_duration_seconds != b.max_duration_seconds:
            lines.append(f"Exception path {name}: maximum duration from "
                         f"{a.max_duration_seconds // 3600} h to "
                         f"{b.max_duration_seconds // 3600} h.")
    return lines


def diff(ns: argparse.Namespace) -> int:
    old, new = _load(ns.old), _load(ns.new)
    if old is None or new is None:
        return 1
    print(f"Policy {old.policy_revision} -> {new.policy_revision}")
    lines = diff_snapshots(old, new)
    for line in lines:
        print(f"- {line}")
    if not lines:
        print("- No change in caps, prices, routes, exception paths or settings.")
    return 0


# ---------------------------------------------------------------- explain
def explain_lines(snap: PolicySnapshot, tenant: str, workload: str, model: str,
                  provider: str, input_tokens: int, max_output_tokens: int,
                  now_ms: int | None = None, service_tier: str = "") -> list[str]:
    from keel_pdp.decision import AuthorizeInput, InvalidRequest, plan, validate

    now = int(time.time() * 1000) if now_ms is None else now_ms
    req = AuthorizeInput("explain", tenant, workload, model, provider, input_tokens,
                         max_output_tokens, service_tier=service_tier)
    try:
        validate(req)
        p = plan(snap, req, now, "pmt_explain")
    except InvalidRequest as exc:
        return [f"Invalid request: {exc}"]
    out = [f"Policy {snap.policy_revision}, prices {snap.price_revision}."]
    routes = snap.match_routes(tenant, workload)
    if routes:
        level = [r for r in routes if r.scope == routes[0].scope]
        for r in level:
            out.append(f"Routing rule {r.id} applies (most specific match: tenant={r.scope[0]} "
                       f"workload={r.scope[1]}): {_route_words(r)}.")
        for r in routes[len(level):]:
            out.append(f"Routing rule {r.id} also matches but is less specific, so it is "
                       "ignored.")
    else:
        out.append("No routing rule matches: every priced model is allowed.")
    if p.denial:
        for reason in p.denial:
            out.append(f"Decision without budgets: DENY {reason.code} - {reason.message}")
        return out
    for n, c in enumerate(p.candidates):
        if n == 0 and (c.provider, c.model) != (p.request.provider or c.provider, model):
            role = f"Instead of {model}, the {p.route_mode} rule picks"
        else:
            role = "Requested model" if n == 0 else f"Downgrade option {n}"
        eff = (time.strftime(" (effective %Y-%m-%d)", time.gmtime(c.price.effective_from_ms / 1000))
               if c.price.effective_from_ms else "")
        held = c.price.service_tier(c.tier) or c.price
        tier = "" if c.rate == held.price else " (context-length tier for this input size)"
        out.append(f"{role} {c.provider}/{c.model}: {_price_words(c.rate)}{eff}{tier}"
                   f"{_tier_words(c.price, c.tier, service_tier)}; "
                   f"estimate {usd(c.estimate_micros)} for {input_tokens} input + "
                   f"{c.output_tokens} output tokens.")
        for i in c.target_idx:
            t = p.targets[i]
            b = t.budget
            why = ", ".join(f"{d}={'any' if v == '*' else v}"
                            for d, v in zip(DIMENSIONS, b.scope, strict=True))
            pairs = zip(b.per, t.split, strict=True)
            split = (f"; counter for {', '.join(f'{DIMENSIONS[j]}={v}' for j, v in pairs)}"
                     if b.per else "")
            window = time.strftime("%Y-%m-%d %H:%M", time.gmtime(t.window_start_ms / 1000))
            out.append(f"  budget {b.id}: {usd(b.limit_micros)} {_PER[b.window]} "
                       f"({'enforce' if b.enforce else 'observe'}, fails "
                       f"{'open' if b.fail_open else 'closed'}) matches because its scope is "
                       f"{why}{split}; current window starts {window} UTC"
                       + (f" (calendar of {b.timezone})" if b.timezone != "UTC" else "")
                       + (f"; exceptions via {b.exception_path}" if b.exception_path else "")
                       + (f"; under {b.parent}" if b.parent else "") + ".")
        if not c.target_idx:
            out.append("  no budget applies to this model.")
    for reason in p.pre_reasons:
        out.append(f"Note: {reason.message}")
    return out


def route_lines(snap: PolicySnapshot, method: str, path: str, host: str,
                named_provider: str, body_model: str) -> tuple[list[str], str, str]:
    """What the Envoy path resolves a provider call to with this bundle (the mesh's own
    resolution), in words, and the (provider, model) to explain; ("", "") when the call
    is not metered or names no model."""
    from keel_pdp.mesh.config import MeshConfig

    res = MeshConfig.from_env().resolve(method, path, host, named_provider, snap)
    where = f"{method} {host}{path.split('?', 1)[0]}"
    if res is None:
        return [f"Route: {where} is not an API Keel meters: the Envoy path refuses it as "
                "NOT_METERED (unless KEEL_MESH_UNMETERED_ROUTES lists it as not LLM "
                "traffic)."], "", ""
    route = res.route
    model = res.model or body_model
    src = res.model_source if res.model else FROM_BODY_WORDS
    dep = f" (Azure deployment {route.deployment!r})" if route.deployment else ""
    lines = [f"Route: {where} resolves to API {route.api}, provider {res.provider}, model "
             f"{model or '(none)'} from {src}{dep}."]
    if not model:
        lines.append("The body names the model on this API: give --model.")
        return lines, "", ""
    if route.deployment and res.model and body_model and body_model != res.model:
        lines.append(f"The body's model {body_model!r} is ignored: the deployment decides.")
    return lines, res.provider, model


FROM_BODY_WORDS = "the body (--model)"


def _tier_words(mp: ModelPrice, held: str, asked: str) -> str:
    """Which service tier the hold is priced at, and what the model lists."""
    named = f"service tier {asked!r}" if asked else "no service tier (the provider's auto)"
    if not mp.service_tiers:
        return f" (asked for {named}; the model has no service-tier rates)" if asked else ""
    listed = ", ".join(["default", *(name for name, _ in mp.service_tiers)])
    at = ("the highest rate of its tiers" if held == "highest"
          else f"the {held} tier's rates")
    if held == "highest" and asked not in ("", "auto"):
        at += " (the tier has no rate of its own: SERVICE_TIER_UNPRICED)"
    return (f" (asked for {named}: held at {at}; the closeout prices the tier the "
            f"provider reports; tiers priced: {listed})")


def explain(ns: argparse.Namespace) -> int:
    snap = _load(ns.policies)
    if snap is None:
        return 1
    if ns.path:
        lines, provider, model = route_lines(snap, ns.method, ns.path, ns.host,
                                             ns.provider, ns.model)
        for line in lines:
            print(line)
        if not model:
            return 1
        for line in explain_lines(snap, ns.tenant, ns.workload, model, provider,
                                  ns.input_tokens, ns.max_output_tokens,
                                  service_tier=ns.service_tier):
            print(line)
        return 0
    if ns.identity:
        from keel_pdp.policy.callers import explain_lines as caller_lines

        for line in caller_lines(snap.callers, ns.identity, ns.tenant, ns.workload):
            print(line)
        if not ns.model:
            return 0
    elif not ns.model:
        print("error: --model is required (or --path, to resolve a provider call as the "
              "mesh does; or --identity, to explain caller bindings)",
              file=sys.stderr)
        return 2
    for line in explain_lines(snap, ns.tenant, ns.workload, ns.model, ns.provider,
                              ns.input_tokens, ns.max_output_tokens,
                              service_tier=ns.service_tier):
        print(line)
    return 0


def register(sub: Any) -> None:
    p_policy = sub.add_parser("policy", help="policy bundle tools")
    psub = p_policy.add_subparsers(dest="policy_command", required=True)
    POLICY_SUBPARSERS.append(psub)
    p = psub.add_parser("check", help="validate a bundle offline (exit 1 naming every problem)")
    p.add_argument("directory")
    p.set_defaults(func=check)
    p = psub.add_parser("diff", help="what changed between two bundles, in words")
    p.add_argument("old")
    p.add_argument("new")
    p.set_defaults(func=diff)
    p = psub.add_parser("explain", help="which budgets, prices and routes apply, and why")
    p.add_argument("--policies", required=True)
    p.add_argument("--tenant", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--identity", default="",
                   help="a caller identity: which Callers bindings match (overlaps "
                        "included) and which RPCs they allow for --tenant/--workload")
    p.add_argument("--provider", default="",
                   help="the provider (with --path: as x-keel-provider would name it)")
    p.add_argument("--path", default="",
                   help="a provider call's path as Envoy sees it, e.g. /openai/deployments/"
                        "chat-prod/chat/completions?api-version=2024-10-21: resolve its API, "
                        "provider and model as the mesh does (Azure deployments through the "
                        "bundle's Deployments map), then explain that model")
    p.add_argument("--host", default="", help="with --path: the :authority the call goes to")
    p.add_argument("--method", default="POST", help="with --path: the HTTP method")
    p.add_argument("--input-tokens", type=int, default=1000)
    p.add_argument("--max-output-tokens", type=int, default=0)
    p.add_argument("--service-tier", default="",
                   help="the service tier the call asks for (OpenAI's service_tier: auto, "
                        "default, flex, priority); none: the provider's auto")
    p.set_defaults(func=explain)
