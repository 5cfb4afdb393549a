-- record.lua: append a decision event that holds nothing, exactly once: a policy
-- denial, or a decision taken while the store was unreachable (replayed from the
-- sidecar's outbox, possibly after an attempt whose reply was lost).
--
-- Every call writes a record under the permit id first and appends only if there
-- was none, so a retried or re-journaled event reaches the stream once:
--   * "marker": a short-lived record (state "denied") for a denial;
--   * "degraded": the permit record of a fail-open ALLOW issued without a hold
--     (state "degraded", its windows, estimate, max_output_tokens, expiry and
--     price), so that any sidecar sharing this store can settle, void or expire it.
--
-- KEYS[1]   decision stream
-- KEYS[2]   permit hash
-- KEYS[3]   expiry zset
-- KEYS[4..] the degraded permit's budget window hashes (none for a marker)
-- ARGV[1] event type   ARGV[2] permit_id   ARGV[3] ts_ms
-- ARGV[4] event data (JSON)   ARGV[5] result (JSON)
-- ARGV[6] "marker" | "degraded"   ARGV[7] record retention (s)
-- ARGV[8] permit meta (JSON)   ARGV[9] estimate micros   ARGV[10] max output tokens
-- ARGV[11] expires_at_ms   ARGV[12] per window expire-at (s), comma separated
-- Returns the stream entry id, or "DUP" when the event was recorded before.

if redis.call('EXISTS', KEYS[2]) == 1 then
  return 'DUP'
end
local retention = tonumber(ARGV[7])
if ARGV[6] == 'degraded' then
  local windows = {}
  for i = 4, #KEYS do windows[#windows + 1] = KEYS[i] end
  local exp = tonumber(ARGV[11])
  redis.call('HSET', KEYS[2], 'state', 'degraded', 'amount', 0, 'est', ARGV[9], 'k', ARGV[10],
    'keys', table.concat(windows, '\n'), 'wx', ARGV[12], 'exp', exp, 'meta', ARGV[8])
  redis.call('EXPIREAT', KEYS[2], math.floor(exp / 1000) + retention)
  redis.call('ZADD', KEYS[3], exp, ARGV[2])
else
  redis.call('HSET', KEYS[2], 'state', 'denied')
  redis.call('EXPIRE', KEYS[2], retention)
end
return redis.call('XADD', KEYS[1], '*', 'type', ARGV[1], 'pid', ARGV[2], 'ts', ARGV[3],
  'data', ARGV[4], 'res', ARGV[5])
