-- grant.lua: record a time-boxed exception grant that raises one budget's cap.
--
-- The hold script sums the unexpired grants of every budget it checks, so a
-- grant takes effect on the next decision and lapses by itself. Idempotent by
-- grant id. Expired grants are pruned here; the hash expires with its last grant.
--
-- KEYS[1] grants hash of the budget (grant_id -> "micros:expires_ms")
-- KEYS[2] decision stream
-- ARGV[1] grant_id   ARGV[2] amount micros   ARGV[3] expires_at_ms   ARGV[4] now_ms
-- ARGV[5] event data (JSON, opaque here)
-- Returns JSON {"created":0|1,"amt":..,"exp":..}

local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  local amount, until_ms = string.match(existing, '^(%d+):(%d+)$')
  return string.format('{"created":0,"amt":%s,"exp":%s}', amount, until_ms)
end
local now = tonumber(ARGV[4])
local latest = tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local _, until_ms = string.match(all[i + 1], '^(%d+):(%d+)$')
  if until_ms == nil or tonumber(until_ms) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif tonumber(until_ms) > latest then
    latest = tonumber(until_ms)
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('PEXPIREAT', KEYS[1], latest)
local res = string.format('{"created":1,"amt":%s,"exp":%s}', ARGV[2], ARGV[3])
redis.call('XADD', KEYS[2], '*', 'type', 'grant', 'pid', ARGV[1], 'ts', ARGV[4],
  'data', ARGV[5], 'res', res)
return res
