-- record.lua: append an event that holds nothing: a policy denial, a decision
-- taken while the store was unreachable (replayed from the sidecar's outbox), or
-- the settlement of such an unheld permit, which books its actual cost.
--
-- KEYS[1]   decision stream
-- KEYS[2..] budget window hashes to book ARGV[6] micros into as settled (may be none)
-- ARGV[1] event type   ARGV[2] permit_id   ARGV[3] ts_ms
-- ARGV[4] event data (JSON)   ARGV[5] result (JSON)
-- ARGV[6] settled micros to add to each window (0 for none)
-- ARGV[7..] per window: expire-at (s)
-- Returns the stream entry id.

local amount = tonumber(ARGV[6]) or 0
if amount ~= 0 then
  for i = 2, #KEYS do
    redis.call('HINCRBY', KEYS[i], 's', amount)
    if redis.call('TTL', KEYS[i]) < 0 then
      redis.call('EXPIREAT', KEYS[i], ARGV[5 + i])
    end
  end
end
return redis.call('XADD', KEYS[1], '*', 'type', ARGV[1], 'pid', ARGV[2], 'ts', ARGV[3],
  'data', ARGV[4], 'res', ARGV[5])
