-- exception_decide.lua: approve or refuse a pending exception request, once.
--
-- An approval writes the grant into the budget's grants hash in the format the
-- authorize script reads ("micros:expires_ms", summed while unexpired), so the
-- raise applies from the next decision on; the request's new state, its ledger
-- event and the grant's own ledger event are written in the same script. A
-- request that is no longer pending is left as it is (the caller tells a retry
-- from a second decision); one whose pending time has passed becomes expired.
--
-- KEYS[1] exception record hash   KEYS[2] grants hash of the budget
-- KEYS[3] decision stream
-- ARGV[1] "approve" | "reject" | "expire" (only record an expiry that is due)
-- ARGV[2] now_ms   ARGV[3] decision (JSON)
-- ARGV[4] grant id   ARGV[5] grant micros   ARGV[6] grant expires_at_ms
-- ARGV[7] denial permit id   ARGV[8] exception event data (JSON)
-- ARGV[9] grant event data (JSON)   ARGV[10] exception id
-- Returns JSON {"r":"unknown"} | {"r":"done","state":..} | {"r":"expired"} | {"r":"pending"} |
--   {"r":"decided","state":..,"dec":<stored decision>}

local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return '{"r":"unknown"}'
end
if state ~= 'pending' then
  local dec = redis.call('HGET', KEYS[1], 'dec') or '{}'
  return string.format('{"r":"decided","state":"%s","dec":%s}', state, dec)
end
local now = tonumber(ARGV[2])
if now >= tonumber(redis.call('HGET', KEYS[1], 'until')) then
  redis.call('HSET', KEYS[1], 'state', 'expired', 'dec',
    string.format('{"at":%d}', now))
  redis.call('XADD', KEYS[3], '*', 'type', 'exception', 'pid', ARGV[7], 'ts', ARGV[2],
    'data', ARGV[8], 'res', string.format('{"st":"EXPIRED","exc":"%s"}', ARGV[10]))
  return '{"r":"expired"}'
end
if ARGV[1] == 'expire' then
  return '{"r":"pending"}'
end
if ARGV[1] == 'approve' then
  local latest = tonumber(ARGV[6])
  local all = redis.call('HGETALL', KEYS[2])
  for i = 1, #all, 2 do
    local _, until_ms = string.match(all[i + 1], '^(%d+):(%d+)$')
    if until_ms == nil or tonumber(until_ms) <= now then
      redis.call('HDEL', KEYS[2], all[i])
    elseif tonumber(until_ms) > latest then
      latest = tonumber(until_ms)
    end
  end
  redis.call('HSET', KEYS[2], ARGV[4], ARGV[5] .. ':' .. ARGV[6])
  redis.call('PEXPIREAT', KEYS[2], latest)
  redis.call('HSET', KEYS[1], 'state', 'approved', 'dec', ARGV[3])
  redis.call('XADD', KEYS[3], '*', 'type', 'exception', 'pid', ARGV[7], 'ts', ARGV[2],
    'data', ARGV[8], 'res', string.format(
      '{"st":"APPROVED","exc":"%s","grant":"%s","amt":%s,"exp":%s}',
      ARGV[10], ARGV[4], ARGV[5], ARGV[6]))
  redis.call('XADD', KEYS[3], '*', 'type', 'grant', 'pid', ARGV[4], 'ts', ARGV[2],
    'data', ARGV[9], 'res', string.format('{"created":1,"amt":%s,"exp":%s}', ARGV[5], ARGV[6]))
  return '{"r":"done","state":"approved"}'
end
redis.call('HSET', KEYS[1], 'state', 'rejected', 'dec', ARGV[3])
redis.call('XADD', KEYS[3], '*', 'type', 'exception', 'pid', ARGV[7], 'ts', ARGV[2],
  'data', ARGV[8], 'res', string.format('{"st":"REJECTED","exc":"%s"}', ARGV[10]))
return '{"r":"done","state":"rejected"}'
