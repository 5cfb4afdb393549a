-- escrow.lua: one side of a transfer of a shared budget's headroom (see
-- keel_pdp/budget/escrow.py). The parent is the shared budget's window; a lease
-- is one shard's slice of it (fields g = leased to the shard, s and h as a
-- window's). Each transfer has an id and is applied once per side: a retry
-- answers what the first attempt did. Every applied step is appended to the
-- side's stream (type "lease").
--
-- Parent steps:  KEYS[1] parent window hash (s, h, l = leased out)
--                KEYS[2] transfer record (this side)   KEYS[3] stream
--                KEYS[4] the parent's exception grants (take only)
--   take: lease min(want, limit + active grants - s - h - l), never below 0;
--         limit -1: a lease's debt (what it spent above what it was leased:
--         overruns, late closeouts), booked in full whatever the parent has left
--   back: take a returned amount back (l -= amount, never below 0)
-- Lease steps:   KEYS[1] lease hash (g, s, h, p = parent key, c = the cap it was
--                        leased under)
--                KEYS[2] transfer record (this side)   KEYS[3] stream
--                KEYS[4] the shard's lease index (lease key -> parent key)
--   credit: g += amount (what the parent's take leased); limit >= 0: c = limit,
--           the cap that take applied (a debt's credit, limit -1, leaves c). A
--           sweeper gives back the unused part of a lease whose c is above the
--           budget's cap in the policy it has loaded (a cap cut mid-window), so
--           the next refill's take applies the new cap.
--   give:   return what the lease does not use: g -= g - s - h (when > 0)
--
-- ARGV: step, transfer id, amount (take: wanted), limit (take; credit: the cap the
--       take applied, or -1), key expire-at (s),
--       now_ms, event data (JSON, opaque here), the other side's key,
--       take only: the least worth leasing (less available: lease nothing)
-- Returns the amount the step moved (a string of digits).

local step, tid = ARGV[1], ARGV[2]
local amount = tonumber(ARGV[3])
local wexp = ARGV[5]
local now = ARGV[6]

local done = redis.call('GET', KEYS[2])
if done then return done end

local moved = 0
local res
if step == 'take' then
  local v = redis.call('HMGET', KEYS[1], 's', 'h', 'l')
  local s, h, l = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local limit = tonumber(ARGV[4])
  local avail = amount
  if limit >= 0 then
    local g = 0
    local now_ms = tonumber(now)
    for _, entry in ipairs(redis.call('HVALS', KEYS[4])) do
      local amt, until_ms = string.match(entry, '^(%d+):(%d+)$')
      if amt and tonumber(until_ms) > now_ms then g = g + tonumber(amt) end
    end
    avail = limit + g - s - h - l
  end
  moved = math.min(amount, avail)
  -- all or nothing below "least": one absurd request must not pull the rest of
  -- the budget into its shard (to be given back a moment later)
  if moved < 0 or moved < (tonumber(ARGV[9]) or 0) then moved = 0 end
  if moved > 0 then
    l = redis.call('HINCRBY', KEYS[1], 'l', moved)
    redis.call('EXPIREAT', KEYS[1], wexp)
  end
  res = string.format('{"dir":"take","amt":%d,"l":%d,"avail":%d}', moved, l, avail - moved)
elseif step == 'back' then
  local l = tonumber(redis.call('HGET', KEYS[1], 'l')) or 0
  moved = math.min(amount, l)
  if moved < 0 then moved = 0 end
  if moved > 0 then l = redis.call('HINCRBY', KEYS[1], 'l', -moved) end
  res = string.format('{"dir":"back","amt":%d,"l":%d}', moved, l)
elseif step == 'credit' then
  moved = amount
  local g = redis.call('HINCRBY', KEYS[1], 'g', moved)
  if tonumber(ARGV[4]) >= 0 then
    -- ARGV[4] as the caller wrote it (digits): no number is formatted here
    redis.call('HSET', KEYS[1], 'p', ARGV[8], 'c', ARGV[4])
  else
    redis.call('HSET', KEYS[1], 'p', ARGV[8])
  end
  redis.call('EXPIREAT', KEYS[1], wexp)
  redis.call('HSET', KEYS[4], KEYS[1], ARGV[8])
  res = string.format('{"dir":"credit","amt":%d,"g":%d}', moved, g)
elseif step == 'give' then
  local v = redis.call('HMGET', KEYS[1], 'g', 's', 'h')
  local g, s, h = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  moved = g - s - h
  if moved < 0 then moved = 0 end
  if moved > 0 then g = redis.call('HINCRBY', KEYS[1], 'g', -moved) end
  res = string.format('{"dir":"give","amt":%d,"g":%d}', moved, g)
else
  return redis.error_reply('unknown escrow step ' .. tostring(step))
end
redis.call('SET', KEYS[2], moved, 'EXAT', wexp)
if moved > 0 then
  redis.call('XADD', KEYS[3], '*', 'type', 'lease', 'pid', tid, 'ts', now, 'data', ARGV[7],
    'res', res)
end
-- '%d', not tostring: tostring keeps 14 significant digits ("1.25e+14")
return string.format('%d', moved)
