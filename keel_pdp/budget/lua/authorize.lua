-- authorize.lua: check every budget that applies, then hold in all of them or none.
--
-- Lua does not roll back, so the script reads and checks everything first and
-- only then writes. The decision event is appended to the stream in the same
-- script, so a balance never moves without an event the ledger can see.
--
-- KEYS[1]   idempotency hash  (fp, res) of (tenant, request_id); written for holds only
-- KEYS[2]   permit hash       (state, amount, keys, wx, meta, ...)
-- KEYS[3]   expiry zset       permit_id scored by expires_at_ms
-- KEYS[4]   decision stream
-- KEYS[5..] one hash per budget window (s = settled micros, h = held micros)
--
-- ARGV[1]  permit_id            ARGV[2]  request fingerprint
-- ARGV[3]  now_ms               ARGV[4]  expires_at_ms
-- ARGV[5]  idempotency ttl (s)  ARGV[6]  permit retention after expiry (s)
-- ARGV[7]  input cost, integer pico-USD
-- ARGV[8]  output price, integer pico-USD per token
-- ARGV[9]  requested output tokens   ARGV[10] minimum useful output tokens
-- ARGV[11] 1 when a CONSTRAIN answer is allowed, else 0
-- ARGV[12] event data (JSON, opaque here)   ARGV[13] permit meta (JSON, opaque here)
-- ARGV[14] n budgets, then per budget: limit_micros, enforce (1|0), window expire-at (s)
--
-- Returns a JSON string:
--   {"r":"replay","res":<stored result>} | {"r":"reused"} |
--   {"d":"ALLOW|CONSTRAIN|DENY","amt":..,"k":..,"b":[[settled,held],..],"fail":i,"shadow":[i..]}
-- Budget figures in "b" are after the hold (ALLOW/CONSTRAIN) or as read (DENY).
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

local idem = redis.call('HMGET', KEYS[1], 'fp', 'res')
if idem[1] then
  if idem[1] ~= ARGV[2] then
    return cjson.encode({r = 'reused'})
  end
  return '{"r":"replay","res":' .. idem[2] .. '}'
end

local now_ms = tonumber(ARGV[3])
local in_pico = tonumber(ARGV[7])
local out_price = tonumber(ARGV[8])
local cap = tonumber(ARGV[9])
local min_out = tonumber(ARGV[10])
local may_constrain = ARGV[11] == '1'
local n = tonumber(ARGV[14])

local settled, held, limits, enforce, wexp = {}, {}, {}, {}, {}
local headroom = nil
for i = 1, n do
  local base = 14 + (i - 1) * 3
  limits[i] = tonumber(ARGV[base + 1])
  enforce[i] = ARGV[base + 2] == '1'
  wexp[i] = ARGV[base + 3]
  local v = redis.call('HMGET', KEYS[4 + i], 's', 'h')
  settled[i] = tonumber(v[1]) or 0
  held[i] = tonumber(v[2]) or 0
  if enforce[i] then
    local room = limits[i] - settled[i] - held[i]
    if headroom == nil or room < headroom then headroom = room end
  end
end

local full = ceil_div(in_pico + cap * out_price, MICRO)
local decision, amount, k = 'DENY', 0, 0
if headroom == nil or full <= headroom then
  decision, amount, k = 'ALLOW', full, cap
elseif may_constrain and headroom >= 0 then
  -- largest k with ceil((in_pico + k * out_price) / MICRO) <= headroom, computed
  -- without forming headroom * MICRO (which may exceed 2^53)
  local a = math.floor(in_pico / MICRO)
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
    k = kmax
    amount = ceil_div(in_pico + k * out_price, MICRO)
    if amount <= headroom then decision = 'CONSTRAIN' end
  end
end

local figures, shadow, fail = {}, {}, nil
if decision == 'DENY' then
  for i = 1, n do
    figures[i] = {settled[i], held[i]}
    if fail == nil and enforce[i] and settled[i] + held[i] + full > limits[i] then
      fail = i
    end
  end
  amount = full
  k = cap
else
  local keys = {}
  for i = 1, n do
    local key = KEYS[4 + i]
    local h = redis.call('HINCRBY', key, 'h', amount)
    redis.call('EXPIREAT', key, wexp[i])
    figures[i] = {settled[i], h}
    if (not enforce[i]) and settled[i] + h > limits[i] then
      table.insert(shadow, i)
    end
    keys[i] = key
  end
  local expires_at = tonumber(ARGV[4])
  redis.call('HSET', KEYS[2], 'state', 'held', 'amount', amount, 'est', amount,
    'keys', table.concat(keys, '\n'), 'wx', table.concat(wexp, ','),
    'exp', expires_at, 'meta', ARGV[13])
  redis.call('EXPIREAT', KEYS[2], math.floor(expires_at / 1000) + tonumber(ARGV[6]))
  redis.call('ZADD', KEYS[3], expires_at, ARGV[1])
end

-- Encoded by hand: cjson prints numbers with 14 significant digits, and budget
-- figures can be larger; '%d' keeps every integer exact.
local parts = {}
for i = 1, n do
  parts[i] = string.format('[%d,%d]', figures[i][1], figures[i][2])
end
local encoded = string.format('{"d":"%s","pid":"%s","exp":%d,"amt":%d,"k":%d,"b":[%s]',
  decision, ARGV[1], tonumber(ARGV[4]), amount, k, table.concat(parts, ','))
if fail ~= nil then encoded = encoded .. string.format(',"fail":%d', fail) end
if #shadow > 0 then encoded = encoded .. ',"shadow":[' .. table.concat(shadow, ',') .. ']' end
encoded = encoded .. '}'
redis.call('XADD', KEYS[4], '*', 'type', 'decision', 'pid', ARGV[1], 'ts', ARGV[3],
  'data', ARGV[12], 'res', encoded)
-- A denial is not replayed: no hold was made, so a retry may simply decide again
-- (for example after an exception grant).
if decision ~= 'DENY' then
  redis.call('HSET', KEYS[1], 'fp', ARGV[2], 'res', encoded)
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
end
return encoded
