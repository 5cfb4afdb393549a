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
-- RECORDS (a line the store puts before this script): the idempotency records it
-- writes. 2: a string, "<fingerprint>\n<result>"; the record is not marked when its
-- permit ends (the permit's own state says so) and a replay marks the permit (rp).
-- 1: a hash (fp, res, pid, exp; st once the permit ended, marked by closeout.lua and
-- release.lua; rp once a replay handed the permit out), as every release before
-- records format 2 wrote and read it. Either form is read (keel_pdp/budget/records.py).
--
-- KEYS[1]          idempotency record of (tenant, request_id); holds only
-- KEYS[2]          permit hash (state, amount, keys, wx, exp, meta, k; format 1 also
--                  est = amount and ik = KEYS[1])
-- KEYS[3]          expiry zset: permit_id scored by expires_at_ms
-- KEYS[4]          decision stream
-- KEYS[5..4+n]     one hash per budget window (s = settled, h = held micro-USD,
--                  t<P> = threshold P% already crossed in this window); for a lease
--                  on a shared budget (limit -1) g = micro-USD leased to the shard
-- KEYS[5+n..4+2n]  one hash per budget of exception grants: id -> "micros:expires_ms"
-- KEYS[5+2n]       optional: the stored copy of the shape's decision event members
--                  (a string, named by the hash of its text) that the event data
--                  refers to; absent when the event data carries them itself
--
-- Cost: Redis runs one script at a time, so its time per call is the fleet's
-- ceiling (bench/bench_script.py measures it against the previous version). In
-- Redis' Lua every table, tonumber, string.format and redis.call is measurable, so
-- the common case does little: one EXISTS for the idempotency record, the abort
-- tombstone and all grant hashes (each is read only when something exists), a
-- window's EXPIREAT only with its first hold (every script that may create a window
-- hash gives it its expiry), thresholds only at or above the lowest level, no table
-- per candidate, and what the caller can work out (each candidate's full estimate,
-- the permit's expire-at, the windows' expire-at list) comes as text ready to store.
--
-- ARGV, what every request of one shape shares first (the caller encodes that part
-- once), then what is the request's own (S = 1 + 4n):
-- ARGV[1]   n budgets, then per budget 4 values:
--           limit_micros, enforce (1|0), window expire-at (s),
--           thresholds in ascending order ("80,100" or "")
-- ARGV[S+1] idempotency ttl (s)   ARGV[S+2] permit retention (s; the caller's, for S+12)
-- ARGV[S+3] minimum useful output tokens
-- ARGV[S+4] every budget's window expire-at, comma-separated, and ARGV[S+5] "1,2,..,n":
--           the permit's "wx" and the reply's "held" when it holds in all of them
-- ARGV[S+6] the field that marks the shape copy KEYS[5+2n] as written ("" without one)
--           and ARGV[S+7] j: the budget whose window hash carries that mark (the one
--           that expires first; 0: none, then the copy itself is looked up)
-- ARGV[S+8] permit_id             ARGV[S+9] request fingerprint   ARGV[S+10] now_ms
-- ARGV[S+11] expires_at_ms        ARGV[S+12] the permit record's expire-at (s)
-- ARGV[S+13] event data (JSON, opaque here)
-- ARGV[S+14] the number of candidates, then per candidate:
--           full estimate (micro-USD: ceil((input cost + output tokens x output
--           price) / 10^6)), input cost (pico-USD), output price (pico-USD/token),
--           output tokens, may constrain (1|0), permit meta (JSON), then its budgets:
--           "a" for all n in order, else m and m budget indexes (1-based)
-- then, optionally, "1" (or "0"): a lease short of the first candidate's estimate answers
--           {"r":"lease","need":[[i,micros]..]} and writes nothing (the caller refills
--           the lease from the shared budget and asks again without it)
-- then, optionally, the shape copy's text and its ttl (s): written to KEYS[5+2n] and
--           marked in window j; without them a copy not marked there answers
--           {"r":"shape"} and writes nothing
--
-- Returns a JSON string:
--   {"r":"replay","res":<stored result>} | {"r":"reused"} | {"r":"aborted"} | {"r":"lease",..} |
--   {"r":"shape"} |
--   {"r":"ended","pid":<earlier permit>,"st":"settled|voided|expired"} |
--   {"d":"ALLOW|CONSTRAIN|DENY","pid":..,"exp":..,"amt":..,"k":..,"c":<candidate>,
--    "b":[[settled,held],..] (every budget; after the hold for held ones),
--    "held":[i..], "fail":i, "shadow":[i..], "alerts":[[i,P]..], "gr":[granted..]}
-- All integers stay below 2^53 (enforced by the caller), so doubles are exact.

local MICRO = 1000000
-- Globals as locals: each global read is a table lookup in Redis' Lua (about 1 us
-- per Authorize in all, bench/bench_script.py).
local ARGV, KEYS = ARGV, KEYS
local floor = math.floor
local smatch, gmatch, ipairs, unpack, tostring = string.match, string.gmatch, ipairs, unpack,
  tostring

local function ceil_div(num, den)
  local q = floor(num / den)
  while q * den < num do q = q + 1 end
  while (q - 1) * den >= num do q = q - 1 end
  return q
end

local function floor_div(num, den)
  local q = floor(num / den)
  while q * den > num do q = q - 1 end
  while (q + 1) * den <= num do q = q + 1 end
  return q
end

-- floor(limit * pct / 100) without forming limit * pct (may exceed 2^53)
local function pct_of(limit, pct)
  local q = floor_div(limit, 100)
  return q * pct + floor_div((limit - q * 100) * pct, 100)
end

local tonumber, call, format, concat = tonumber, redis.call, string.format, table.concat

local n = tonumber(ARGV[1])
local S = 1 + 4 * n
local pid = ARGV[S + 8]
local fingerprint = ARGV[S + 9]
local now_text = ARGV[S + 10]
local expires_text = ARGV[S + 11]

-- A candidate's budgets (its arguments from ARGV[p]): their count, and whether they
-- are all n in order (then no indexes follow: budget j is j).
local function budgets_of(p)
  local ms = ARGV[p + 6]
  if ms == 'a' then return n, true end
  return tonumber(ms), false
end

-- The common case: no idempotency record, tombstone or grant exists, and one EXISTS
-- says so.
local granted, any_grant = nil, false
if call('EXISTS', KEYS[1], KEYS[2], unpack(KEYS, 5 + n, 4 + 2 * n)) > 0 then
  -- The record: a string (records format 2), a hash (format 1, or an earlier
  -- release), or none (then the permit's tombstone or a grant exists).
  local fp, res, rpid, ended, exp, replayed
  local rec = redis.pcall('GET', KEYS[1])
  if type(rec) == 'string' then
    local cut = string.find(rec, '\n', 1, true) or 0
    fp, res = string.sub(rec, 1, cut - 1), string.sub(rec, cut + 1)
    rpid, exp = smatch(res, '"pid":"([^"]*)"'), smatch(res, '"exp":(%d+)')
  elseif type(rec) == 'table' and rec.err then
    local idem = call('HMGET', KEYS[1], 'fp', 'res', 'pid', 'st', 'exp', 'rp')
    fp, res, rpid, ended, exp, replayed = idem[1], idem[2], idem[3], idem[4], idem[5], idem[6]
  end
  if fp then
    if fp ~= fingerprint then
      return '{"r":"reused"}'
    end
    -- A replay returns the permit only while it is held: once it has ended (or its
    -- hold time has passed) the request_id cannot carry another provider call.
    if not ended and exp and tonumber(exp) <= tonumber(now_text) then
      ended = 'expired'
    end
    -- The permit says whether it ended (format 2 does not mark the record). It is
    -- in the request's shard, so in this slot; not declared, as only the record
    -- names it. Gone (its retention passed) counts as expired.
    local pkey = string.sub(KEYS[2], 1, #KEYS[2] - #pid) .. (rpid or '')
    local permit = nil
    if not ended then
      permit = call('HMGET', pkey, 'state', 'rp')
      if permit[1] ~= 'held' then ended = permit[1] or 'expired' end
    end
    if ended then
      return cjson.encode({r = 'ended', pid = rpid, st = ended})
    end
    -- The held permit is handed out now, whatever became of the first answer: an
    -- abort from the sidecar that lost that answer must leave it held (abort.lua).
    if type(rec) == 'string' then
      if not permit[2] then call('HSET', pkey, 'rp', '1') end
    elseif not replayed then
      call('HSET', KEYS[1], 'rp', '1')
    end
    return '{"r":"replay","res":' .. res .. '}'
  end
  -- The permit id is new for every decision; a record under it can only be the
  -- tombstone an aborted decision left (its answer timed out): hold nothing.
  if call('EXISTS', KEYS[2]) == 1 then
    return '{"r":"aborted"}'
  end
  if n > 0 and call('EXISTS', unpack(KEYS, 5 + n, 4 + 2 * n)) > 0 then granted = {} end
end

-- Per budget i: ARGV[4i-2] limit, ARGV[4i-1] enforce, ARGV[4i] window expire-at,
-- ARGV[4i+1] thresholds (read where used, not copied).
-- Indexed 1..n only (never by length): sized up front, no rehash while filled.
local settled, held, limits, fresh = {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}
-- The same figures as text, for the reply: Redis' own text where the script has it
-- (a number printed by string.format costs about 0.1 us here; a string costs a copy).
local settled_s, held_s = {0, 0, 0, 0}, {0, 0, 0, 0}
local leased = nil
-- The shape copy's mark is read with window j's figures (no call of its own).
local mark, markj, marked = ARGV[S + 6], tonumber(ARGV[S + 7]), false
for i = 1, n do
  local limit = tonumber(ARGV[4 * i - 2])
  local v
  if limit < 0 then
    -- a lease on a shared budget: its limit is what the shard was leased
    if i == markj then
      v = call('HMGET', KEYS[4 + i], 's', 'h', 'g', mark)
      marked = v[4]
    else
      v = call('HMGET', KEYS[4 + i], 's', 'h', 'g')
    end
    limit = tonumber(v[3]) or 0
    leased = leased or {}
    leased[i] = true
  elseif i == markj then
    v = call('HMGET', KEYS[4 + i], 's', 'h', mark)
    marked = v[3]
  else
    v = call('HMGET', KEYS[4 + i], 's', 'h')
  end
  local s, h = v[1], v[2]
  settled_s[i], held_s[i] = s or '0', h or '0'
  settled[i] = s and tonumber(s) or 0
  held[i] = h and tonumber(h) or 0
  fresh[i] = not h
  if granted then
    local g = 0
    for _, entry in ipairs(call('HVALS', KEYS[4 + n + i])) do
      local amount, until_ms = smatch(entry, '^(%d+):(%d+)$')
      if amount and tonumber(until_ms) > tonumber(now_text) then g = g + tonumber(amount) end
    end
    granted[i] = g
    if g > 0 then any_grant = true end
    limit = limit + g
  end
  limits[i] = limit
end

-- Per candidate c: where its arguments start, its full estimate and its room (the
-- least headroom of its enforce budgets; nil when none enforces). The rest of its
-- arguments are read where they are used.
local cpos, cfull, croom = {0}, {0}, {0}
local pos = S + 15
local nc = tonumber(ARGV[S + 14])
for c = 1, nc do
  local m, all = budgets_of(pos)
  local room = nil
  for j = 1, m do
    local i = all and j or tonumber(ARGV[pos + 6 + j])
    if ARGV[4 * i - 1] == '1' then
      local r = limits[i] - settled[i] - held[i]
      if room == nil or r < room then room = r end
    end
  end
  cpos[c] = pos
  cfull[c] = tonumber(ARGV[pos])
  croom[c] = room
  pos = pos + 7 + (all and 0 or m)
end

-- "1" after the candidates: a lease short of the first candidate's estimate asks
-- for a refill instead of deciding.
if leased and ARGV[pos] == '1' then
  local need = {}
  local p1 = cpos[1]
  local m, all = budgets_of(p1)
  for j = 1, m do
    local i = all and j or tonumber(ARGV[p1 + 6 + j])
    if leased[i] and ARGV[4 * i - 1] == '1' then
      local short = cfull[1] - (limits[i] - settled[i] - held[i])
      if short > 0 then need[#need + 1] = format('[%d,%d]', i, short) end
    end
  end
  if #need > 0 then
    return '{"r":"lease","need":[' .. concat(need, ',') .. ']}'
  end
end

-- The decision event refers to a stored copy of its shape's members (KEYS[5+2n]):
-- the caller sends the copy when it has not yet (or to refresh its expiry); else it
-- must exist, so that no event refers to a copy that is not there. The copy is
-- written with a mark in window j's hash, in this one script (a failover keeps or
-- loses both). A mark may outlive its copy only when no caller sent the copy for
-- its whole ttl, and each caller sends it again after an hour (store.py).
local copy = KEYS[5 + 2 * n]
if copy then
  if ARGV[pos + 1] then
    call('SET', copy, ARGV[pos + 1], 'EX', ARGV[pos + 2])
    if markj ~= 0 then
      call('HSET', KEYS[4 + markj], mark, '1')
      call('EXPIREAT', KEYS[4 + markj], ARGV[4 * markj], 'NX')
    end
  elseif markj == 0 then
    if call('EXISTS', copy) == 0 then return '{"r":"shape"}' end
  elseif not marked then
    return '{"r":"shape"}'
  end
end

local decision, chosen, amount, k_s, amount_s = 'DENY', nil, 0, nil, nil
for c = 1, nc do
  local room = croom[c]
  if room == nil or cfull[c] <= room then
    -- Amounts go to redis.call and into records as text: the caller's text where it
    -- has it (Redis 7.0 prints every Lua number argument with "%.17g", about 0.15 us
    -- each here).
    decision, chosen, amount = 'ALLOW', c, cfull[c]
    amount_s, k_s = ARGV[cpos[c]], ARGV[cpos[c] + 3]
    if c > 1 then decision = 'CONSTRAIN' end
    break
  end
end
if chosen == nil then
  local min_out = tonumber(ARGV[S + 3])
  for c = 1, nc do
    local p = cpos[c]
    local headroom = croom[c]
    local in_pico, out_price, cap = tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2]),
      tonumber(ARGV[p + 3])
    if ARGV[p + 4] == '1' and headroom >= 0 then
      local a = floor(in_pico / MICRO)
      local r = in_pico - a * MICRO
      local d = headroom - a
      local kmax = -1
      if d >= 0 then
        if out_price == 0 then
          kmax = cap
        else
          local q1 = floor_div(d, out_price)
          local r1 = d - q1 * out_price
          if q1 >= cap then
            kmax = cap
          else
            kmax = q1 * MICRO + floor_div(r1 * MICRO - r, out_price)
          end
        end
      end
      if kmax > cap then kmax = cap end
      if kmax >= min_out and kmax >= 0 then
        local amt = ceil_div(in_pico + kmax * out_price, MICRO)
        if amt <= headroom then
          decision, chosen, amount = 'CONSTRAIN', c, amt
          amount_s, k_s = format('%d', amt), format('%d', kmax)
          break
        end
      end
    end
  end
end

local shadow, alerts, heldidx, fail = nil, nil, '', nil
local alert_events = nil
if chosen == nil then
  local p1 = cpos[1]
  local m, all = budgets_of(p1)
  for j = 1, m do
    local i = all and j or tonumber(ARGV[p1 + 6 + j])
    if fail == nil and ARGV[4 * i - 1] == '1' and settled[i] + held[i] + cfull[1] > limits[i] then
      fail = i
    end
  end
  amount, amount_s = cfull[1], ARGV[p1]
  k_s = ARGV[p1 + 3]
  chosen = 1
else
  local p = cpos[chosen]
  local m, all = budgets_of(p)
  for j = 1, m do
    local i = all and j or tonumber(ARGV[p + 6 + j])
    local key = KEYS[4 + i]
    local h = call('HINCRBY', key, 'h', amount_s)
    if fresh[i] then call('EXPIREAT', key, ARGV[4 * i]) end
    local before = settled[i] + held[i]
    held_s[i] = format('%d', h)
    local after = settled[i] + h
    if ARGV[4 * i - 1] ~= '1' and after > limits[i] then
      shadow = shadow and (shadow .. ',' .. i) or tostring(i)
    end
    -- Thresholds come in ascending order: below the lowest level nothing crosses.
    local thresholds = ARGV[4 * i + 1]
    if thresholds ~= ''
        and after >= pct_of(limits[i], tonumber(smatch(thresholds, '^%d+'))) then
      for pp in gmatch(thresholds, '%d+') do
        local level = pct_of(limits[i], tonumber(pp))
        if before < level and after >= level then
          if call('HSETNX', key, 't' .. pp, now_text) == 1 then
            alerts = (alerts and (alerts .. ',') or '') .. format('[%d,%s]', i, pp)
            alert_events = alert_events or {}
            alert_events[#alert_events + 1] = format(
              '{"budget":%d,"pct":%s,"level":%d,"committed":%d,"limit":%d}',
              i, pp, level, after, limits[i])
          end
        end
      end
    end
  end
  -- The held windows are usually all of them, in order: KEYS[5..4+n] and the
  -- shape's expire-at list as they are.
  local keys, wx
  if all then
    keys = concat(KEYS, '\n', 5, 4 + n)
    wx = ARGV[S + 4]
    heldidx = ARGV[S + 5]
  else
    local list, wl = {}, {}
    for j = 1, m do
      local i = tonumber(ARGV[p + 6 + j])
      list[j] = KEYS[4 + i]
      wl[j] = ARGV[4 * i]
    end
    keys = concat(list, '\n')
    wx = concat(wl, ',')
    heldidx = concat(ARGV, ',', p + 7, p + 6 + m)
  end
  if RECORDS == 2 then
    -- The estimate is the amount held ('est' only where they differ: degraded
    -- permits); the request's record is not marked when the permit ends, so the
    -- permit need not name it ('ik').
    call('HSET', KEYS[2], 'state', 'held', 'amount', amount_s, 'keys', keys, 'wx', wx,
      'exp', expires_text, 'meta', ARGV[p + 5], 'k', k_s)
  else
    call('HSET', KEYS[2], 'state', 'held', 'amount', amount_s, 'est', amount_s, 'keys', keys,
      'wx', wx, 'exp', expires_text, 'meta', ARGV[p + 5], 'k', k_s, 'ik', KEYS[1])
  end
  call('EXPIREAT', KEYS[2], ARGV[S + 12])
  call('ZADD', KEYS[3], expires_text, pid)
end

-- Encoded by hand: cjson prints numbers with 14 significant digits, and budget
-- figures can be larger. Every figure is already text (Redis', the caller's, or
-- '%d' of the new hold), so the reply is one concatenation of strings.
local tail = '}'
if fail ~= nil or shadow or alerts or any_grant then
  tail = ''
  if fail ~= nil then tail = format(',"fail":%d', fail) end
  if shadow then tail = tail .. ',"shadow":[' .. shadow .. ']' end
  if alerts then tail = tail .. ',"alerts":[' .. alerts .. ']' end
  if any_grant then
    local gparts = {}
    for i = 1, n do gparts[i] = format('%d', granted[i]) end
    tail = tail .. ',"gr":[' .. concat(gparts, ',') .. ']'
  end
  tail = tail .. '}'
end
local blist
if n == 3 then  -- the common shape: no list
  blist = '[' .. settled_s[1] .. ',' .. held_s[1] .. '],[' .. settled_s[2] .. ',' .. held_s[2]
    .. '],[' .. settled_s[3] .. ',' .. held_s[3] .. ']'
else
  local parts = {}
  for i = 1, n do
    parts[i] = '[' .. settled_s[i] .. ',' .. held_s[i] .. ']'
  end
  blist = concat(parts, ',')
end
local encoded = '{"d":"' .. decision .. '","pid":"' .. pid .. '","exp":' .. expires_text
  .. ',"amt":' .. amount_s .. ',"k":' .. k_s
  .. ',"c":' .. (chosen == 1 and '1' or format('%d', chosen))
  .. ',"b":[' .. blist .. '],"held":[' .. heldidx .. ']' .. tail
local event = ARGV[S + 13]
call('XADD', KEYS[4], '*', 'type', 'decision', 'pid', pid, 'ts', now_text,
  'data', event, 'res', encoded)
-- Soft-threshold crossings follow the decision that caused them (once per window).
if alert_events then
  for _, a in ipairs(alert_events) do
    call('XADD', KEYS[4], '*', 'type', 'alert', 'pid', pid, 'ts', now_text,
      'data', event, 'res', a)
  end
end
-- A denial is not replayed: no hold was made, so a retry may simply decide again
-- (for example after an exception grant).
if decision ~= 'DENY' then
  if RECORDS == 2 then
    call('SET', KEYS[1], fingerprint .. '\n' .. encoded, 'EX', ARGV[S + 1])
  else
    call('HSET', KEYS[1], 'fp', fingerprint, 'res', encoded, 'pid', pid, 'exp', expires_text)
    call('EXPIRE', KEYS[1], ARGV[S + 1])
  end
end
return encoded
