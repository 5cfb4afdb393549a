-- record.lua: append an event that holds nothing: a policy denial, a decision
-- taken while the store was unreachable (replayed from the sidecar's outbox), or
-- the settlement of such an unheld permit, which books its actual cost.
--
-- A settlement also writes the permit record (state "settled"), once: if the
-- record exists, nothing is booked again, so a retry after a lost reply cannot
-- count the cost twice, and later closeouts answer ALREADY_SETTLED.
--
-- KEYS[1]   decision stream
-- KEYS[2]   permit hash
-- KEYS[3..] budget window hashes to book ARGV[6] micros into as settled (may be none)
-- ARGV[1] event type   ARGV[2] permit_id   ARGV[3] ts_ms
-- ARGV[4] event data (JSON)   ARGV[5] result (JSON)
-- ARGV[6] settled micros to add to each window (0 for none)
-- ARGV[7] permit record retention (s)   ARGV[8] permit meta (JSON, for the record)
-- ARGV[9..] per window: expire-at (s)
-- Returns the stream entry id, or "DUP" when the settlement was already booked.

if ARGV[1] == 'settlement' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return 'DUP'
  end
  local windows = {}
  for i = 3, #KEYS do windows[#windows + 1] = KEYS[i] end
  redis.call('HSET', KEYS[2], 'state', 'settled', 'amount', 0, 'est', 0, 'act', ARGV[6],
    'keys', table.concat(windows, '\n'), 'prior', 'unheld', 'settled_at', ARGV[3],
    'meta', ARGV[8])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[7]))
end
local amount = tonumber(ARGV[6]) or 0
if amount ~= 0 then
  for i = 3, #KEYS do
    redis.call('HINCRBY', KEYS[i], 's', amount)
    if redis.call('TTL', KEYS[i]) < 0 then
      redis.call('EXPIREAT', KEYS[i], ARGV[6 + i])
    end
  end
end
return redis.call('XADD', KEYS[1], '*', 'type', ARGV[1], 'pid', ARGV[2], 'ts', ARGV[3],
  'data', ARGV[4], 'res', ARGV[5])
