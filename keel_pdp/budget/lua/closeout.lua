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
-- KEYS[4]   the permit's idempotency record (KEYS[1] again when it has none): with
--           records format 1 (RECORDS, put before this script by the store) its
--           hash is marked ended so a replay of its request_id cannot ride on a
--           settled permit
-- KEYS[5..] the permit's budget window hashes, in the order stored in the permit
--
-- ARGV[1] permit_id   ARGV[2] now_ms   ARGV[3] actual cost micros
-- ARGV[4] event data (JSON, opaque here)   ARGV[5] output tokens
-- ARGV[6] 1 when input tokens exceed the permit's estimate, else 0
-- ARGV[7] overrun factor   ARGV[8] overrun slack micros
-- ARGV[9] Keel's own price of the usage and its own flags, as JSON list members
--         (`210,["SERVICE_TIER_UNPRICED"]`): kept with the settlement ("pk"), so a
--         retry is answered with the first answer's price and flags
--
-- Returns JSON: {"st":"UNKNOWN_PERMIT"} | {"st":"KEYS_MISMATCH"} |
--   {"st":"IMPLAUSIBLE","est":..,"k":..,"ceiling":..} |
--   {"st":<status>,"act":..,"est":..,"amt":..,"prior":<state before>[,"flags":[..]]}
-- (ALREADY_SETTLED: "prior" is the state before the settlement that happened, so a
-- retry is answered with that settlement's figures; "settled" when not recorded;
-- "pk" is [the settlement's ARGV[9]], absent when not recorded.)

local call, format, tonumber = redis.call, string.format, tonumber
local p = call('HMGET', KEYS[1], 'state', 'amount', 'est', 'keys', 'wx', 'act', 'k', 'flags')
local state = p[1]
if not state or state == 'denied' then
  return '{"st":"UNKNOWN_PERMIT"}'
end
local n = #KEYS - 4
if table.concat(KEYS, '\n', 5, 4 + n) ~= (p[4] or '') then
  return '{"st":"KEYS_MISMATCH"}'
end
local amount = tonumber(p[2]) or 0
-- 'est': the estimate, where it is not the amount held (a degraded permit's; and
-- every permit of records format 1)
local est = tonumber(p[3]) or amount
if state == 'settled' then
  local first = call('HMGET', KEYS[1], 'prior', 'pk')
  local res = format('{"st":"ALREADY_SETTLED","act":%d,"est":%d,"amt":%d,"prior":"%s"',
    tonumber(p[6]) or 0, est, amount, first[1] or 'settled')
  if p[8] and p[8] ~= '' then res = res .. ',"flags":[' .. p[8] .. ']' end
  if first[2] then res = res .. ',"pk":[' .. first[2] .. ']' end
  return res .. '}'
end

local actual = tonumber(ARGV[3])
local k = tonumber(p[7]) or 0
local ceiling = est * tonumber(ARGV[7]) + tonumber(ARGV[8])
if actual > ceiling then
  return format('{"st":"IMPLAUSIBLE","est":%d,"k":%d,"ceiling":%d}', est, k, ceiling)
end
local flag_text = ''
if (k > 0 and tonumber(ARGV[5]) > k) or ARGV[6] == '1' then
  flag_text = '"USAGE_ABOVE_PERMIT"'
end
if actual > est then
  flag_text = flag_text == '' and '"COST_ABOVE_HOLD"' or (flag_text .. ',"COST_ABOVE_HOLD"')
end

local status = 'SETTLED'
local prior = state
if state == 'expired' then status = 'SETTLED_AFTER_EXPIRY' end
if state == 'voided' then status = 'SETTLED_AFTER_VOID' end
if state == 'degraded' then prior = 'unheld' end
-- A window hash gets its expiry when a script creates it. HINCRBY answers the
-- field's new value: only when s now holds exactly what was added can the hash be
-- new (first settlement of the window, or a window that expired meanwhile), and
-- only then is its expiry set, if it has none (NX, as the TTL check it replaces:
-- another permit's expire-at never shortens a window's life).
-- Amounts go to redis.call as text (the caller's for the actual cost): Redis 7.0
-- prints every Lua number argument with "%.17g" (about 0.15 us each here,
-- bench/bench_script.py).
local actual_s = ARGV[3]
local unhold = state == 'held' and format('%d', -amount)
local wx = nil
for i = 1, n do
  local key = KEYS[4 + i]
  if unhold then
    call('HINCRBY', key, 'h', unhold)
  end
  if call('HINCRBY', key, 's', actual_s) == actual then
    if wx == nil then
      wx = {}
      for w in string.gmatch(p[5] or '', '[^,]+') do wx[#wx + 1] = w end
    end
    if wx[i] then call('EXPIREAT', key, wx[i], 'NX') end
  end
end
call('ZREM', KEYS[3], ARGV[1])
call('HSET', KEYS[1], 'state', 'settled', 'act', actual_s, 'settled_at', ARGV[2],
  'prior', prior, 'flags', flag_text, 'pk', ARGV[9])
-- Records format 1: the request's idempotency hash is marked, for sidecars of
-- releases that read only the record (authorize.lua reads the permit's state). A
-- string record (format 2) is never marked.
if RECORDS == 1 and KEYS[4] ~= KEYS[1] and redis.pcall('HGET', KEYS[4], 'pid') == ARGV[1] then
  call('HSET', KEYS[4], 'st', 'settled')
end
local res
if state == 'degraded' then
  res = format('{"st":"%s","act":%s,"est":%d,"amt":0,"prior":"unheld"', status, actual_s, est)
else
  res = format('{"st":"%s","act":%s,"est":%d,"amt":%d,"prior":"%s"', status, actual_s, est,
    amount, prior)
end
if flag_text ~= '' then res = res .. ',"flags":[' .. flag_text .. ']' end
res = res .. '}'
call('XADD', KEYS[2], '*', 'type', 'settlement', 'pid', ARGV[1], 'ts', ARGV[2],
  'data', ARGV[4], 'res', res)
return res
