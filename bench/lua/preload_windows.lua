-- preload_windows.lua (benchmarks only): write COUNT budget windows shaped like real ones.
--
-- One hash per window, fields copied from a real window (ARGV), named like a
-- per-tenant budget's window. Keys are built from ARGV[1]: fine on the
-- benchmark's own standalone Redis, not on a cluster.
--
-- ARGV[1] key base ("<prefix>:{pdp}:")   ARGV[2] first index   ARGV[3] count
-- ARGV[4] window start ms (name part)    ARGV[5] expire-at (unix s)
-- ARGV[6] n, then n field/value pairs
-- Returns the number of windows written.
local base = ARGV[1]
local first = tonumber(ARGV[2])
local count = tonumber(ARGV[3])
local n = tonumber(ARGV[6])
local f = {}
for i = 1, n * 2 do f[i] = ARGV[6 + i] end
for i = first, first + count - 1 do
  local key = base .. 'b:preload-daily:1:t' .. string.format('%07d', i) .. ':' .. ARGV[4]
  redis.call('HSET', key, unpack(f))
  redis.call('EXPIREAT', key, ARGV[5])
end
return count
