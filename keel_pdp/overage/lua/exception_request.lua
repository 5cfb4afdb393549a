-- exception_request.lua: record a pending exception request, once.
--
-- A workload owner asks to exceed the budget that denied one of their requests.
-- The request record and its ledger event are written together, so no request
-- exists that the ledger cannot see. Idempotent by exception id (derived by the
-- caller from the denial and the budget): a retry with the same content answers
-- the stored record; different content is refused.
--
-- KEYS[1] exception record hash   KEYS[2] index zset (id scored by requested_at_ms)
-- KEYS[3] decision stream
-- ARGV[1] exception id   ARGV[2] content fingerprint   ARGV[3] now_ms
-- ARGV[4] pending_until_ms   ARGV[5] record retention (s)   ARGV[6] record (JSON)
-- ARGV[7] denial permit id (the stream event's pid)   ARGV[8] event data (JSON)
-- Returns JSON {"created":1} | {"created":0,"same":0|1,"state":..}

local state = redis.call('HGET', KEYS[1], 'state')
if state then
  local same = 0
  if redis.call('HGET', KEYS[1], 'fp') == ARGV[2] then same = 1 end
  return string.format('{"created":0,"same":%d,"state":"%s"}', same, state)
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'fp', ARGV[2], 'rec', ARGV[6],
  'at', ARGV[3], 'until', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]), ARGV[1])
redis.call('XADD', KEYS[3], '*', 'type', 'exception', 'pid', ARGV[7], 'ts', ARGV[3],
  'data', ARGV[8], 'res', string.format('{"st":"PENDING","exc":"%s"}', ARGV[1]))
return '{"created":1}'
