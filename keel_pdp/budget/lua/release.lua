-- release.lua: end a hold without settling it, as a void (caller) or an expiry (sweeper).
--
-- Only a permit still in state "held" (or "degraded": issued without a hold, so
-- nothing to give back) changes; any other state answers with that state and
-- writes nothing, so voids and sweeps are idempotent and a hold reaches exactly
-- one terminal state. An expiry is only applied once the permit's expires_at has
-- passed ARGV[2] (the sweeper sends the earlier of its clock and the store's, so
-- a sweeper with a fast clock cannot cut a live hold short).
--
-- KEYS[1]   permit hash
-- KEYS[2]   decision stream
-- KEYS[3]   expiry zset
-- KEYS[4]   the permit's idempotency record (KEYS[1] again when it has none): with
--           records format 1 (RECORDS, put before this script by the store) its
--           hash is marked ended so a replay of its request_id cannot ride on a
--           released permit
-- KEYS[5..] the permit's budget window hashes, in the order stored in the permit
--
-- ARGV[1] permit_id   ARGV[2] now_ms   ARGV[3] "voided" | "expired"
-- ARGV[4] event data (JSON, opaque here)
--
-- Returns JSON: {"st":"UNKNOWN_PERMIT"} | {"st":"KEYS_MISMATCH"} |
--   {"st":"RELEASED","amt":..} | {"st":"NOT_DUE"} | {"st":"NOOP","state":<current state>}

local p = redis.call('HMGET', KEYS[1], 'state', 'amount', 'keys', 'exp', 'wx')
local state = p[1]
if not state or state == 'denied' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return cjson.encode({st = 'UNKNOWN_PERMIT'})
end
local n = #KEYS - 4
if table.concat(KEYS, '\n', 5, 4 + n) ~= (p[3] or '') then
  return cjson.encode({st = 'KEYS_MISMATCH'})
end
if state ~= 'held' and state ~= 'degraded' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return cjson.encode({st = 'NOOP', state = state})
end
local target = ARGV[3]
if target == 'expired' and tonumber(p[4]) > tonumber(ARGV[2]) then
  return cjson.encode({st = 'NOT_DUE'})
end
local amount = tonumber(p[2]) or 0
if state == 'degraded' then amount = 0 end
if amount ~= 0 then
  local wx = nil
  for i = 1, n do
    -- A window that expired under the hold comes back as -amount: give it the
    -- expiry every window hash has (authorize.lua relies on it).
    if redis.call('HINCRBY', KEYS[4 + i], 'h', -amount) == -amount then
      if wx == nil then
        wx = {}
        for w in string.gmatch(p[5] or '', '[^,]+') do wx[#wx + 1] = w end
      end
      if wx[i] then redis.call('EXPIREAT', KEYS[4 + i], wx[i], 'NX') end
    end
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', target, 'released_at', ARGV[2])
-- Records format 1: the request's idempotency hash is marked, for sidecars of
-- releases that read only the record (authorize.lua reads the permit's state). A
-- string record (format 2) is never marked.
if RECORDS == 1 and KEYS[4] ~= KEYS[1] and redis.pcall('HGET', KEYS[4], 'pid') == ARGV[1] then
  redis.call('HSET', KEYS[4], 'st', target)
end
-- '%d', not cjson: cjson prints numbers with 14 significant digits
local res = string.format('{"st":"RELEASED","amt":%d,"state":"%s"}', amount, target)
local etype = 'void'
if target == 'expired' then etype = 'expiry' end
redis.call('XADD', KEYS[2], '*', 'type', etype, 'pid', ARGV[1], 'ts', ARGV[2],
  'data', ARGV[4], 'res', res)
return res
