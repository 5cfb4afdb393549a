-- abort.lua: undo an authorize whose answer never reached the caller.
--
-- When the authorize script's reply times out, the sidecar answers by the
-- budgets' fail modes under a new (degraded) permit id, and sends this script
-- for the permit id it had sent. Either order is safe:
--   * the authorize script has not run yet: a tombstone record is written, and
--     the authorize script, seeing a record under its (always new) permit id,
--     holds nothing and appends nothing;
--   * it ran and held: the hold is released at once (state "voided", a void
--     event whose reason says why), and the request_id's idempotency record is
--     dropped so a retry is decided afresh instead of replaying an answer the
--     caller never had;
--   * it ran and held, and a retry of the request (on any sidecar) was answered
--     with this permit before the abort came: the caller has it now, so it stays
--     held, to be settled, voided or expired like any other ({"st":"NOOP",
--     "state":"held","replayed":true}). Releasing it would leave a caller with a
--     permit whose hold is gone: its provider call would run unreserved.
-- A permit that already ended (a replay delivered it and it was settled or
-- voided) is left as it is.
--
-- KEYS[1]   permit hash
-- KEYS[2]   decision stream
-- KEYS[3]   expiry zset
-- KEYS[4]   the request's idempotency record: a string whose result names its permit
--           (records format 2; a replay marks the permit itself, rp) or a hash
--           (pid, rp: format 1 and earlier releases)
-- KEYS[5..] every budget window the request could have held (the shape's windows)
--
-- ARGV[1] permit_id   ARGV[2] now_ms   ARGV[3] event data (JSON)
-- ARGV[4] tombstone retention (s)
--
-- Returns JSON: {"st":"TOMBSTONE"} | {"st":"RELEASED","amt":..} |
--   {"st":"NOOP","state":..[,"replayed":true]}

local p = redis.call('HMGET', KEYS[1], 'state', 'amount', 'keys', 'wx', 'rp')
local state = p[1]
if not state then
  redis.call('HSET', KEYS[1], 'state', 'aborted', 'aborted_at', ARGV[2])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  return cjson.encode({st = 'TOMBSTONE'})
end
if state ~= 'held' then
  return cjson.encode({st = 'NOOP', state = state})
end
local rec_pid, replayed = nil, p[5]
local rec = redis.pcall('GET', KEYS[4])
if type(rec) == 'string' then
  rec_pid = string.match(rec, '"pid":"([^"]*)"')
elseif type(rec) == 'table' and rec.err then
  local idem = redis.call('HMGET', KEYS[4], 'pid', 'rp')
  rec_pid = idem[1]
  replayed = replayed or (rec_pid == ARGV[1] and idem[2])
end
if replayed then
  return '{"st":"NOOP","state":"held","replayed":true}'
end
local allowed = {}
for i = 5, #KEYS do allowed[KEYS[i]] = true end
local amount = tonumber(p[2]) or 0
for key in string.gmatch(p[3] or '', '[^\n]+') do
  if not allowed[key] then
    return cjson.encode({st = 'KEYS_MISMATCH'})
  end
end
local wx = {}
for w in string.gmatch(p[4] or '', '[^,]+') do wx[#wx + 1] = w end
local j = 0
for key in string.gmatch(p[3] or '', '[^\n]+') do
  j = j + 1
  -- A window that expired under the hold comes back as -amount: give it the
  -- expiry every window hash has (authorize.lua relies on it).
  if redis.call('HINCRBY', key, 'h', -amount) == -amount and amount ~= 0 and wx[j] then
    redis.call('EXPIREAT', key, wx[j], 'NX')
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'voided', 'released_at', ARGV[2], 'aborted', '1')
if rec_pid == ARGV[1] then
  redis.call('DEL', KEYS[4])
end
-- '%d', not cjson: cjson prints numbers with 14 significant digits
local res = string.format('{"st":"RELEASED","amt":%d,"state":"voided"}', amount)
redis.call('XADD', KEYS[2], '*', 'type', 'void', 'pid', ARGV[1], 'ts', ARGV[2],
  'data', ARGV[3], 'res', res)
return res
