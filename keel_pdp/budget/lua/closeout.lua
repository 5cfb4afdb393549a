-- closeout.lua: settle provider-reported cost against a permit, once.
--
-- A held permit releases its hold and books the actual cost in every budget
-- window it held. An expired or voided permit already released its hold, but
-- the provider billed the call, so the actual cost is still booked. A settled
-- permit answers with its stored figures (idempotent by permit_id).
--
-- KEYS[1]   permit hash
-- KEYS[2]   decision stream
-- KEYS[3]   expiry zset
-- KEYS[4..] the permit's budget window hashes, in the order stored in the permit
--
-- ARGV[1] permit_id   ARGV[2] now_ms   ARGV[3] actual cost micros
-- ARGV[4] event data (JSON, opaque here)
--
-- Returns JSON: {"st":"UNKNOWN_PERMIT"} | {"st":"KEYS_MISMATCH"} |
--   {"st":<status>,"act":..,"est":..,"amt":..,"prior":<state before>}

local p = redis.call('HMGET', KEYS[1], 'state', 'amount', 'est', 'keys', 'wx', 'act')
local state = p[1]
if not state then
  return cjson.encode({st = 'UNKNOWN_PERMIT'})
end
local n = #KEYS - 3
local expected = {}
for i = 1, n do expected[i] = KEYS[3 + i] end
if table.concat(expected, '\n') ~= p[4] then
  return cjson.encode({st = 'KEYS_MISMATCH'})
end
local amount = tonumber(p[2])
local est = tonumber(p[3])
if state == 'settled' then
  return cjson.encode({st = 'ALREADY_SETTLED', act = tonumber(p[6]), est = est, amt = amount,
    prior = 'settled'})
end

local actual = tonumber(ARGV[3])
local status = 'SETTLED'
if state == 'expired' then status = 'SETTLED_AFTER_EXPIRY' end
if state == 'voided' then status = 'SETTLED_AFTER_VOID' end
local wx = {}
for w in string.gmatch(p[5] or '', '[^,]+') do table.insert(wx, w) end
for i = 1, n do
  local key = KEYS[3 + i]
  if state == 'held' then
    redis.call('HINCRBY', key, 'h', -amount)
  end
  redis.call('HINCRBY', key, 's', actual)
  if wx[i] and redis.call('TTL', key) < 0 then
    redis.call('EXPIREAT', key, wx[i])
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'settled', 'act', actual, 'settled_at', ARGV[2],
  'prior', state)
local res = cjson.encode({st = status, act = actual, est = est, amt = amount, prior = state})
redis.call('XADD', KEYS[2], '*', 'type', 'settlement', 'pid', ARGV[1], 'ts', ARGV[2],
  'data', ARGV[4], 'res', res)
return res
