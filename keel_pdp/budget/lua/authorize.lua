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
-- KEYS[1]          idempotency hash (fp, res, pid, exp; st once the permit ended; rp once
--                  a replay handed the permit out) of (tenant, request_id); holds only
-- KEYS[2]          permit hash (state, amount, keys, wx, meta, k, ik = KEYS[1], ...)
-- KEYS[3]          expiry zset: permit_id scored by expires_at_ms
-- KEYS[4]          decision stream
-- KEYS[5..4+n]     one hash per budget window (s = settled, h = held micro-USD,
--                  t<P> = threshold P% already crossed in this window); for a lease
--                  on a shared budget (limit -1) g = micro-USD leased to the shard
-- KEYS[5+n..4+2n]  one hash per budget of exception grants: id -> "micros:expires_ms"
--
-- Cost: Redis runs one script at a time, so its time per call is the fleet's
-- ceiling (bench/bench_script.py measures it against the previous version). In
-- Redis' Lua every table, tonumber, string.format and redis.call is measurable, so
-- the common case does little: one EXISTS for the abort tombstone and all grant
-- hashes (HVALS only when a grant hash exists), a window's EXPIREAT only with its
-- first hold (every script that may create a window hash gives it its expiry),
-- thresholds only at or above the lowest level, and the shared per-budget
-- arguments read where they are used.
--
-- ARGV, what every request of one shape shares first (the caller encodes that part
-- once), then what is the request's own (S = 1 + 4n):
-- ARGV[1]   n budgets, then per budget 4 values:
--           limit_micros, enforce (1|0), window expire-at (s),
--           thresholds in ascending order ("80,100" or "")
-- ARGV[S+1] idempotency ttl (s)   ARGV[S+2] permit retention (s)
-- ARGV[S+3] minimum useful output tokens
-- ARGV[S+4] permit_id             ARGV[S+5] request fingerprint   ARGV[S+6] now_ms
-- ARGV[S+7] expires_at_ms         ARGV[S+8] event data (JSON, opaque here)
-- ARGV[S+9] the number of candidates, then per candidate:
--           input cost (pico-USD), output price (pico-USD/token), output tokens,
--           may constrain (1|0), permit meta (JSON), m, then m budget indexes (1-based)
-- then, optionally, "1": a lease short of the first candidate's estimate answers
--           {"r":"lease","need":[[i,micros]..]} and writes nothing (the caller refills
--           the lease from the shared budget and asks again without it)
--
-- Returns a JSON string:
--   {"r":"replay","res":<stored result>} | {"r":"reused"} | {"r":"aborted"} | {"r":"lease",..} |
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
local pid = ARGV[S + 4]
local fingerprint = ARGV[S + 5]
local now_text = ARGV[S + 6]
local now_ms = tonumber(now_text)
local expires_text = ARGV[S + 7]
local expires_at = tonumber(expires_text)

local idem = call('HMGET', KEYS[1], 'fp', 'res', 'pid', 'st', 'exp', 'rp')
if idem[1] then
  if idem[1] ~= fingerprint then
    return '{"r":"reused"}'
  end
  -- A replay returns the permit only while it is held: once it has ended (or its
  -- hold time has passed) the request_id cannot carry another provider call.
  local ended = idem[4]
  if not ended and idem[5] and tonumber(idem[5]) <= now_ms then ended = 'expired' end
  if ended then
    return cjson.encode({r = 'ended', pid = idem[3], st = ended})
  end
  -- The held permit is handed out now, whatever became of the first answer: an
  -- abort from the sidecar that lost that answer must leave it held (abort.lua).
  if not idem[6] then call('HSET', KEYS[1], 'rp', '1') end
  return '{"r":"replay","res":' .. idem[2] .. '}'
end
-- The permit id is new for every decision; a record under it can only be the
-- tombstone an aborted decision left (its answer timed out): hold nothing. One
-- EXISTS asks for it and for the grant hashes at once: usually none exists.
local granted, any_grant = nil, false
if call('EXISTS', KEYS[2], unpack(KEYS, 5 + n, 4 + 2 * n)) > 0 then
  if call('EXISTS', KEYS[2]) == 1 then
    return '{"r":"aborted"}'
  end
  granted = {}
end

-- Per budget i: ARGV[4i-2] limit, ARGV[4i-1] enforce, ARGV[4i] window expire-at,
-- ARGV[4i+1] thresholds (read where used, not copied).
-- Indexed 1..n only (never by length): sized up front, no rehash while filled.
local settled, held, limits, fresh = {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}
local leased = {}
for i = 1, n do
  local v = call('HMGET', KEYS[4 + i], 's', 'h', 'g')
  settled[i] = tonumber(v[1]) or 0
  held[i] = tonumber(v[2]) or 0
  fresh[i] = not v[2]
  local limit = tonumber(ARGV[4 * i - 2])
  if limit < 0 then
    -- a lease on a shared budget: its limit is what the shard was leased
    limit = tonumber(v[3]) or 0
    leased[i] = true
  end
  if granted then
    local g = 0
    for _, entry in ipairs(call('HVALS', KEYS[4 + n + i])) do
      local amount, until_ms = smatch(entry, '^(%d+):(%d+)$')
      if amount and tonumber(until_ms) > now_ms then g = g + tonumber(amount) end
    end
    granted[i] = g
    if g > 0 then any_grant = true end
    limit = limit + g
  end
  limits[i] = limit
end

local cands = {}
local pos = S + 9
local nc = tonumber(ARGV[pos])
pos = pos + 1
for c = 1, nc do
  local m = tonumber(ARGV[pos + 5])
  local cand = {in_pico = tonumber(ARGV[pos]), out_price = tonumber(ARGV[pos + 1]),
    cap = tonumber(ARGV[pos + 2]), may_constrain = ARGV[pos + 3] == '1', meta = ARGV[pos + 4],
    idx = {}}
  local idx = cand.idx
  local room = nil
  for j = 1, m do
    local i = tonumber(ARGV[pos + 5 + j])
    idx[j] = i
    if ARGV[4 * i - 1] == '1' then
      local r = limits[i] - settled[i] - held[i]
      if room == nil or r < room then room = r end
    end
  end
  pos = pos + 6 + m
  cand.room = room
  cand.full = ceil_div(cand.in_pico + cand.cap * cand.out_price, MICRO)
  cands[c] = cand
end

if ARGV[pos] == '1' then
  local need = {}
  for _, i in ipairs(cands[1].idx) do
    if leased[i] and ARGV[4 * i - 1] == '1' then
      local short = cands[1].full - (limits[i] - settled[i] - held[i])
      if short > 0 then need[#need + 1] = format('[%d,%d]', i, short) end
    end
  end
  if #need > 0 then
    return '{"r":"lease","need":[' .. concat(need, ',') .. ']}'
  end
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
  local min_out = tonumber(ARGV[S + 3])
  for c = 1, nc do
    local cand = cands[c]
    local headroom = cand.room
    if cand.may_constrain and headroom >= 0 then
      -- largest k with ceil((in_pico + k * out_price) / MICRO) <= headroom, without
      -- forming headroom * MICRO (which may exceed 2^53)
      local a = floor(cand.in_pico / MICRO)
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

local shadow, alerts, heldidx, fail, amount_s = nil, nil, '', nil, nil
local alert_events = nil
if chosen == nil then
  local first = cands[1]
  for _, i in ipairs(first.idx) do
    if fail == nil and ARGV[4 * i - 1] == '1' and settled[i] + held[i] + first.full > limits[i] then
      fail = i
    end
  end
  amount = first.full
  k = first.cap
  chosen = 1
else
  local cand = cands[chosen]
  local idx = cand.idx
  local m = #idx
  local wx = {}
  -- Amounts go to redis.call as strings made once: Redis 7.0 prints every Lua
  -- number argument with "%.17g" (about 0.15 us each here).
  amount_s = format('%d', amount)
  for j = 1, m do
    local i = idx[j]
    local key = KEYS[4 + i]
    local before = settled[i] + held[i]
    local h = call('HINCRBY', key, 'h', amount_s)
    if fresh[i] then call('EXPIREAT', key, ARGV[4 * i]) end
    held[i] = h
    local after = settled[i] + h
    if ARGV[4 * i - 1] ~= '1' and after > limits[i] then
      shadow = shadow and (shadow .. ',' .. i) or tostring(i)
    end
    -- Thresholds come in ascending order: below the lowest level nothing crosses.
    local thresholds = ARGV[4 * i + 1]
    if thresholds ~= ''
        and after >= pct_of(limits[i], tonumber(smatch(thresholds, '^%d+'))) then
      for p in gmatch(thresholds, '%d+') do
        local level = pct_of(limits[i], tonumber(p))
        if before < level and after >= level then
          if call('HSETNX', key, 't' .. p, now_ms) == 1 then
            alerts = (alerts and (alerts .. ',') or '') .. format('[%d,%s]', i, p)
            alert_events = alert_events or {}
            alert_events[#alert_events + 1] = format(
              '{"budget":%d,"pct":%s,"level":%d,"committed":%d,"limit":%d}',
              i, p, level, after, limits[i])
          end
        end
      end
    end
    wx[j] = ARGV[4 * i]
  end
  -- The held windows are usually all of them, in order: KEYS[5..4+n] as they are.
  local keys
  if m == n and idx[m] == n and idx[1] == 1 then
    keys = concat(KEYS, '\n', 5, 4 + n)
    heldidx = concat(idx, ',')
  else
    local list = {}
    for j = 1, m do list[j] = KEYS[4 + idx[j]] end
    keys = concat(list, '\n')
    heldidx = concat(idx, ',')
  end
  call('HSET', KEYS[2], 'state', 'held', 'amount', amount_s, 'est', amount_s, 'keys', keys,
    'wx', concat(wx, ','), 'exp', expires_text, 'meta', cand.meta, 'k', format('%d', k),
    'ik', KEYS[1])
  call('EXPIREAT', KEYS[2], format('%d', floor(expires_at / 1000) + tonumber(ARGV[S + 2])))
  call('ZADD', KEYS[3], expires_text, pid)
end

-- Encoded by hand: cjson prints numbers with 14 significant digits, and budget
-- figures can be larger; '%d' keeps every integer exact.
local figures
if n == 3 then  -- the common shape: one format, no list
  figures = format('[%d,%d],[%d,%d],[%d,%d]', settled[1], held[1], settled[2], held[2],
    settled[3], held[3])
else
  local parts = {}
  for i = 1, n do
    parts[i] = format('[%d,%d]', settled[i], held[i])
  end
  figures = concat(parts, ',')
end
local encoded = format(
  '{"d":"%s","pid":"%s","exp":%s,"amt":%d,"k":%d,"c":%d,"b":[%s],"held":[%s]',
  decision, pid, expires_text, amount, k, chosen, figures, heldidx)
if fail ~= nil then encoded = encoded .. format(',"fail":%d', fail) end
if shadow then encoded = encoded .. ',"shadow":[' .. shadow .. ']' end
if alerts then encoded = encoded .. ',"alerts":[' .. alerts .. ']' end
if any_grant then
  local gparts = {}
  for i = 1, n do gparts[i] = format('%d', granted[i]) end
  encoded = encoded .. ',"gr":[' .. concat(gparts, ',') .. ']'
end
encoded = encoded .. '}'
local event = ARGV[S + 8]
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
  call('HSET', KEYS[1], 'fp', fingerprint, 'res', encoded, 'pid', pid, 'exp', expires_text)
  call('EXPIRE', KEYS[1], ARGV[S + 1])
end
return encoded
