-- Baseline for bench/bench_script.py: keel_pdp/budget/lua/authorize.lua verbatim as of commit 70efe85 (before the cheaper script); not used by the product.
-- authorize.lua: check every budget that applies, then hold in all of them or none.
--
-- Lua does not roll back, so the script reads and checks everything first and
-- only then writes. The decision event is appended to the stream in the same
-- script, so a balance never moves without an event the ledger can see.
--
-- A request may come with several candidates (the requested model first, then
-- cheaper models down the workload's downgrade chain). Each candidate names the
-- budgets that apply to it. The first candidate whose full estimate fits every
-- one of its enforce budgets is held; failing that, a candidate that allows it
-- is held with the largest max_output_tokens that fits; failing that, DENY.
-- Active exception grants raise a budget's limit while they last.
--
-- KEYS[1]          idempotency hash (fp, res, pid, exp; st once the permit ended) of
--                  (tenant, request_id); holds only
-- KEYS[2]          permit hash (state, amount, keys, wx, meta, k, ik = KEYS[1], ...)
-- KEYS[3]          expiry zset: permit_id scored by expires_at_ms
-- KEYS[4]          decision stream
-- KEYS[5..4+n]     one hash per budget window (s = settled, h = held micro-USD,
--                  t<P> = threshold P% already crossed in this window)
-- KEYS[5+n..4+2n]  one hash per budget of exception grants: id -> "micros:expires_ms"
--
-- ARGV, what every request of one shape shares first (the caller encodes that part
-- once), then what is the request's own (S = 1 + 4n):
-- ARGV[1]   n budgets, then per budget 4 values:
--           limit_micros, enforce (1|0), window expire-at (s), thresholds ("80,100" or "")
-- ARGV[S+1] idempotency ttl (s)   ARGV[S+2] permit retention (s)
-- ARGV[S+3] minimum useful output tokens
-- ARGV[S+4] permit_id             ARGV[S+5] request fingerprint   ARGV[S+6] now_ms
-- ARGV[S+7] expires_at_ms         ARGV[S+8] event data (JSON, opaque here)
-- ARGV[S+9] the number of candidates, then per candidate:
--           input cost (pico-USD), output price (pico-USD/token), output tokens,
--           may constrain (1|0), permit meta (JSON), m, then m budget indexes (1-based)
--
-- Returns a JSON string:
--   {"r":"replay","res":<stored result>} | {"r":"reused"} | {"r":"aborted"} |
--   {"r":"ended","pid":<earlier permit>,"st":"settled|voided|expired"} |
--   {"d":"ALLOW|CONSTRAIN|DENY","pid":..,"exp":..,"amt":..,"k":..,"c":<candidate>,
--    "b":[[settled,held],..] (every budget; after the hold for held ones),
--    "held":[i..], "fail":i, "shadow":[i..], "alerts":[[i,P]..], "gr":[granted..]}
-- All integers stay below 2^53 (enforced by the caller), so doubles are exact.

local MICRO = 1000000

local function ceil_div(num, den)
  local q = math.floor(num / den)
  while q * den < num do q = q + 1 end
  while (q - 1) * den >= num do q = q - 1 end
  return q
end

local function floor_div(num, den)
  local q = math.floor(num / den)
  while q * den > num do q = q - 1 end
  while (q + 1) * den <= num do q = q + 1 end
  return q
end

-- floor(limit * pct / 100) without forming limit * pct (may exceed 2^53)
local function pct_of(limit, pct)
  local q = floor_div(limit, 100)
  return q * pct + floor_div((limit - q * 100) * pct, 100)
end

local n = tonumber(ARGV[1])
local S = 1 + 4 * n
local idem_ttl = tonumber(ARGV[S + 1])
local retention = tonumber(ARGV[S + 2])
local min_out = tonumber(ARGV[S + 3])
local pid = ARGV[S + 4]
local fingerprint = ARGV[S + 5]
local now_text = ARGV[S + 6]
local now_ms = tonumber(now_text)
local expires_at = tonumber(ARGV[S + 7])
local event = ARGV[S + 8]

local idem = redis.call('HMGET', KEYS[1], 'fp', 'res', 'pid', 'st', 'exp')
if idem[1] then
  if idem[1] ~= fingerprint then
    return cjson.encode({r = 'reused'})
  end
  -- A replay returns the permit only while it is held: once it has ended (or its
  -- hold time has passed) the request_id cannot carry another provider call.
  local ended = idem[4]
  if not ended and idem[5] and tonumber(idem[5]) <= now_ms then ended = 'expired' end
  if ended then
    return cjson.encode({r = 'ended', pid = idem[3], st = ended})
  end
  return '{"r":"replay","res":' .. idem[2] .. '}'
end
-- The permit id is new for every decision; a record under it can only be the
-- tombstone an aborted decision left (its answer timed out): hold nothing.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return cjson.encode({r = 'aborted'})
end

local settled, held, limits, enforce, wexp, thresholds, granted = {}, {}, {}, {}, {}, {}, {}
local any_grant = false
for i = 1, n do
  local base = 1 + (i - 1) * 4
  enforce[i] = ARGV[base + 2] == '1'
  wexp[i] = ARGV[base + 3]
  thresholds[i] = ARGV[base + 4]
  local v = redis.call('HMGET', KEYS[4 + i], 's', 'h')
  settled[i] = tonumber(v[1]) or 0
  held[i] = tonumber(v[2]) or 0
  local g = 0
  local grants = redis.call('HVALS', KEYS[4 + n + i])
  for _, entry in ipairs(grants) do
    local amount, until_ms = string.match(entry, '^(%d+):(%d+)$')
    if amount and tonumber(until_ms) > now_ms then g = g + tonumber(amount) end
  end
  granted[i] = g
  if g > 0 then any_grant = true end
  limits[i] = tonumber(ARGV[base + 1]) + g
end

local cands = {}
local pos = S + 9
local nc = tonumber(ARGV[pos])
pos = pos + 1
for c = 1, nc do
  local cand = {in_pico = tonumber(ARGV[pos]), out_price = tonumber(ARGV[pos + 1]),
    cap = tonumber(ARGV[pos + 2]), may_constrain = ARGV[pos + 3] == '1', meta = ARGV[pos + 4],
    idx = {}}
  local m = tonumber(ARGV[pos + 5])
  for j = 1, m do cand.idx[j] = tonumber(ARGV[pos + 5 + j]) end
  pos = pos + 6 + m
  local room = nil
  for _, i in ipairs(cand.idx) do
    if enforce[i] then
      local r = limits[i] - settled[i] - held[i]
      if room == nil or r < room then room = r end
    end
  end
  cand.room = room
  cand.full = ceil_div(cand.in_pico + cand.cap * cand.out_price, MICRO)
  cands[c] = cand
end

local decision, chosen, amount, k = 'DENY', nil, 0, 0
for c = 1, nc do
  local cand = cands[c]
  if cand.room == nil or cand.full <= cand.room then
    decision, chosen, amount, k = 'ALLOW', c, cand.full, cand.cap
    if c > 1 then decision = 'CONSTRAIN' end
    break
  end
end
if chosen == nil then
  for c = 1, nc do
    local cand = cands[c]
    local headroom = cand.room
    if cand.may_constrain and headroom >= 0 then
      -- largest k with ceil((in_pico + k * out_price) / MICRO) <= headroom, without
      -- forming headroom * MICRO (which may exceed 2^53)
      local a = math.floor(cand.in_pico / MICRO)
      local r = cand.in_pico - a * MICRO
      local d = headroom - a
      local kmax = -1
      if d >= 0 then
        if cand.out_price == 0 then
          kmax = cand.cap
        else
          local q1 = floor_div(d, cand.out_price)
          local r1 = d - q1 * cand.out_price
          if q1 >= cand.cap then
            kmax = cand.cap
          else
            kmax = q1 * MICRO + floor_div(r1 * MICRO - r, cand.out_price)
          end
        end
      end
      if kmax > cand.cap then kmax = cand.cap end
      if kmax >= min_out and kmax >= 0 then
        local amt = ceil_div(cand.in_pico + kmax * cand.out_price, MICRO)
        if amt <= headroom then
          decision, chosen, amount, k = 'CONSTRAIN', c, amt, kmax
          break
        end
      end
    end
  end
end

local figures, shadow, alerts, heldidx, fail = {}, {}, {}, {}, nil
local alert_events = {}
for i = 1, n do figures[i] = {settled[i], held[i]} end
if chosen == nil then
  local first = cands[1]
  for _, i in ipairs(first.idx) do
    if fail == nil and enforce[i] and settled[i] + held[i] + first.full > limits[i] then
      fail = i
    end
  end
  amount = first.full
  k = first.cap
  chosen = 1
else
  local cand = cands[chosen]
  local keys = {}
  local wx = {}
  for j, i in ipairs(cand.idx) do
    local key = KEYS[4 + i]
    local before = settled[i] + held[i]
    local h = redis.call('HINCRBY', key, 'h', amount)
    redis.call('EXPIREAT', key, wexp[i])
    figures[i] = {settled[i], h}
    local after = settled[i] + h
    if (not enforce[i]) and after > limits[i] then
      table.insert(shadow, i)
    end
    for p in string.gmatch(thresholds[i], '%d+') do
      local level = pct_of(limits[i], tonumber(p))
      if before < level and after >= level then
        if redis.call('HSETNX', key, 't' .. p, now_ms) == 1 then
          table.insert(alerts, string.format('[%d,%s]', i, p))
          table.insert(alert_events, string.format(
            '{"budget":%d,"pct":%s,"level":%d,"committed":%d,"limit":%d}',
            i, p, level, after, limits[i]))
        end
      end
    end
    keys[j] = key
    wx[j] = wexp[i]
    heldidx[j] = i
  end
  redis.call('HSET', KEYS[2], 'state', 'held', 'amount', amount, 'est', amount,
    'keys', table.concat(keys, '\n'), 'wx', table.concat(wx, ','),
    'exp', expires_at, 'meta', cand.meta, 'k', k, 'ik', KEYS[1])
  redis.call('EXPIREAT', KEYS[2], math.floor(expires_at / 1000) + retention)
  redis.call('ZADD', KEYS[3], expires_at, pid)
end

-- Encoded by hand: cjson prints numbers with 14 significant digits, and budget
-- figures can be larger; '%d' keeps every integer exact.
local parts = {}
for i = 1, n do
  parts[i] = string.format('[%d,%d]', figures[i][1], figures[i][2])
end
local encoded = string.format(
  '{"d":"%s","pid":"%s","exp":%d,"amt":%d,"k":%d,"c":%d,"b":[%s],"held":[%s]',
  decision, pid, expires_at, amount, k, chosen, table.concat(parts, ','),
  table.concat(heldidx, ','))
if fail ~= nil then encoded = encoded .. string.format(',"fail":%d', fail) end
if #shadow > 0 then encoded = encoded .. ',"shadow":[' .. table.concat(shadow, ',') .. ']' end
if #alerts > 0 then encoded = encoded .. ',"alerts":[' .. table.concat(alerts, ',') .. ']' end
if any_grant then
  local gparts = {}
  for i = 1, n do gparts[i] = string.format('%d', granted[i]) end
  encoded = encoded .. ',"gr":[' .. table.concat(gparts, ',') .. ']'
end
encoded = encoded .. '}'
redis.call('XADD', KEYS[4], '*', 'type', 'decision', 'pid', pid, 'ts', now_text,
  'data', event, 'res', encoded)
-- Soft-threshold crossings follow the decision that caused them (once per window).
for _, a in ipairs(alert_events) do
  redis.call('XADD', KEYS[4], '*', 'type', 'alert', 'pid', pid, 'ts', now_text,
    'data', event, 'res', a)
end
-- A denial is not replayed: no hold was made, so a retry may simply decide again
-- (for example after an exception grant).
if decision ~= 'DENY' then
  redis.call('HSET', KEYS[1], 'fp', fingerprint, 'res', encoded, 'pid', pid, 'exp', expires_at)
  redis.call('EXPIRE', KEYS[1], idem_ttl)
end
return encoded
