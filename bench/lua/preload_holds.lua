-- preload_holds.lua (benchmarks only): write COUNT open holds shaped like real ones.
--
-- Each hold is what authorize.lua leaves behind for an ALLOW: a permit hash, an
-- idempotency hash and an entry in the expiry zset. The field values are copied
-- from a real permit (ARGV), so the memory per hold is the real one. Keys other
-- than the zset are built here from ARGV[1]; that is fine on the benchmark's own
-- standalone Redis and would not be on a cluster.
--
-- KEYS[1]  expiry zset
-- ARGV[1]  key base ("<prefix>:{pdp}:")      ARGV[2] first index   ARGV[3] count
-- ARGV[4]  expires_at_ms (zset score)        ARGV[5] permit TTL s  ARGV[6] idempotency TTL s
-- ARGV[7]  n, then n permit field/value pairs; then m, then m idempotency field/value pairs
-- Returns the number of holds written.
local base = ARGV[1]
local first = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local exp = ARGV[4]
local pttl = tonumber(ARGV[5])
local ittl = tonumber(ARGV[6])
local n = tonumber(ARGV[7])
local pf = {}
for i = 1, n * 2 do pf[i] = ARGV[7 + i] end
local m = tonumber(ARGV[8 + n * 2])
local idf = {}
for i = 1, m * 2 do idf[i] = ARGV[8 + n * 2 + i] end
for i = first, first + count - 1 do
  local pid = string.format('pmt_%012x%016x', 1, i)
  local pkey = base .. 'permit:' .. pid
  redis.call('HSET', pkey, unpack(pf))
  redis.call('EXPIRE', pkey, pttl)
  local ikey = base .. 'req:preload:' .. string.format('%09d', i)
  redis.call('HSET', ikey, unpack(idf))
  redis.call('EXPIRE', ikey, ittl)
  redis.call('ZADD', KEYS[1], exp, pid)
end
return count
