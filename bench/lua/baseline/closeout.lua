-- Baseline for bench/bench_script.py: keel_pdp/budget/lua/closeout.lua verbatim as of commit 70efe85 (before the cheaper script); not used by the product.
-- closeout.lua: settle provider-reported cost against a permit, once.
--
-- A held permit releases its hold and books the actual cost in every budget
-- window it held. An expired or voided permit already released its hold, but
-- the provider billed the call, so the actual cost is still booked; so is the
-- cost of a degraded permit (issued without a hold while the store was
-- unreachable, journaled here later by record.lua). A settled permit answers
-- with its stored figures (idempotent by permit_id).
--
-- Overruns: a cost above est * factor + slack (est: the permit's estimate) is
-- impossible for the permit and books nothing ({"st":"IMPLAUSIBLE"}); anything
-- above the permit's own figures but below that ceiling is booked and flagged
-- (USAGE_ABOVE_PERMIT: output tokens above its max_output_tokens, or input
-- tokens above its estimate; COST_ABOVE_HOLD: cost above the estimate).
--
-- KEYS[1]   permit hash
-- KEYS[2]   decision stream
-- KEYS[3]   expiry zset
-- KEYS[4]   the permit's idempotency hash (KEYS[1] again when it has none): marked
--           ended so a replay of its request_id cannot ride on a settled permit
-- KEYS[5..] the permit's budget window hashes, in the order stored in the permit
--
-- ARGV[1] permit_id   ARGV[2] now_ms   ARGV[3] actual cost micros
-- ARGV[4] event data (JSON, opaque here)   ARGV[5] output tokens
-- ARGV[6] 1 when input tokens exceed the permit's estimate, else 0
-- ARGV[7] overrun factor   ARGV[8] overrun slack micros
--
-- Returns JSON: {"st":"UNKNOWN_PERMIT"} | {"st":"KEYS_MISMATCH"} |
--   {"st":"IMPLAUSIBLE","est":..,"k":..,"ceiling":..} |
--   {"st":<status>,"act":..,"est":..,"amt":..,"prior":<state before>[,"flags":[..]]}

local p = redis.call('HMGET', KEYS[1], 'state', 'amount', 'est', 'keys', 'wx', 'act', 'k',
  'flags')
local state = p[1]
if not state or state == 'denied' then
  return cjson.encode({st = 'UNKNOWN_PERMIT'})
end
local n = #KEYS - 4
local expected = {}
for i = 1, n do expected[i] = KEYS[4 + i] end
if table.concat(expected, '\n') ~= (p[4] or '') then
  return cjson.encode({st = 'KEYS_MISMATCH'})
end
local amount = tonumber(p[2]) or 0
local est = tonumber(p[3]) or 0
if state == 'settled' then
  local res = string.format('{"st":"ALREADY_SETTLED","act":%d,"est":%d,"amt":%d,"prior":"settled"',
    tonumber(p[6]) or 0, est, amount)
  if p[8] and p[8] ~= '' then res = res .. ',"flags":[' .. p[8] .. ']' end
  return res .. '}'
end

local actual = tonumber(ARGV[3])
local k = tonumber(p[7]) or 0
local ceiling = est * tonumber(ARGV[7]) + tonumber(ARGV[8])
if actual > ceiling then
  return string.format('{"st":"IMPLAUSIBLE","est":%d,"k":%d,"ceiling":%d}', est, k, ceiling)
end
local flags = {}
if (k > 0 and tonumber(ARGV[5]) > k) or ARGV[6] == '1' then
  table.insert(flags, '"USAGE_ABOVE_PERMIT"')
end
if actual > est then table.insert(flags, '"COST_ABOVE_HOLD"') end
local flag_text = table.concat(flags, ',')

local status = 'SETTLED'
local prior = state
if state == 'expired' then status = 'SETTLED_AFTER_EXPIRY' end
if state == 'voided' then status = 'SETTLED_AFTER_VOID' end
if state == 'degraded' then prior = 'unheld' end
local wx = {}
for w in string.gmatch(p[5] or '', '[^,]+') do table.insert(wx, w) end
for i = 1, n do
  local key = KEYS[4 + i]
  if state == 'held' then
    redis.call('HINCRBY', key, 'h', -amount)
  end
  redis.call('HINCRBY', key, 's', actual)
  if wx[i] and redis.call('TTL', key) < 0 then
    redis.call('EXPIREAT', key, wx[i])
  end
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HSET', KEYS[1], 'state', 'settled', 'act', actual, 'settled_at', ARGV[2],
  'prior', prior, 'flags', flag_text)
if KEYS[4] ~= KEYS[1] and redis.call('HGET', KEYS[4], 'pid') == ARGV[1] then
  redis.call('HSET', KEYS[4], 'st', 'settled')
end
local res = string.format('{"st":"%s","act":%d,"est":%d,"amt":%d,"prior":"%s"', status, actual,
  est, amount, prior)
if state == 'degraded' then
  res = string.format('{"st":"%s","act":%d,"est":%d,"amt":0,"prior":"unheld"', status, actual, est)
end
if flag_text ~= '' then res = res .. ',"flags":[' .. flag_text .. ']' end
res = res .. '}'
redis.call('XADD', KEYS[2], '*', 'type', 'settlement', 'pid', ARGV[1], 'ts', ARGV[2],
  'data', ARGV[4], 'res', res)
return res
