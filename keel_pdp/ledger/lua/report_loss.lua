-- report_loss.lua: report entries deleted from the decision stream before the
-- ledger's consumer group read them, exactly once.
--
-- Every writer of the group sees such a loss, and a restarted writer sees it again
-- until the group has read past it (for ever, when nothing follows the gap). So
-- the losses already reported are kept in a hash next to the dead-letter stream,
-- and the dead-letter record and that mark are written here together: two
-- writers racing, a writer that dies right after reporting and a restarted one
-- report each loss once. A gap that grew since it was reported (the stream was
-- trimmed further while the group stood still) is reported for the entries not
-- reported yet.
--
-- KEYS[1]   dead-letter stream (<stream>:dead)
-- KEYS[2]   losses already reported (<stream>:losses), hash: field -> entries
-- ARGV[1] field: the group and where the loss is
-- ARGV[2] entries lost as counted now ("" when Redis cannot tell how many)
-- ARGV[3] src_id (the group's position before the gap)   ARGV[4] at_ms
-- ARGV[5] the reason, after its count ("entries after ... were deleted ...")
-- Returns the entries newly reported: n > 0; -1 for some (how many is unknown);
-- 0 when this loss was reported before.

local prev = redis.call('HGET', KEYS[2], ARGV[1])
local reason
local lost
if ARGV[2] == '' then
  if prev then
    return 0
  end
  reason = 'some ' .. ARGV[5]
  lost = ''
  redis.call('HSET', KEYS[2], ARGV[1], 'some')
else
  local seen = tonumber(ARGV[2])
  local before = tonumber(prev or '0') or 0
  if seen <= before then
    return 0
  end
  lost = seen - before
  if before > 0 then
    reason = lost .. ' more ' .. ARGV[5] .. ' (' .. seen .. ' in all)'
  else
    reason = lost .. ' ' .. ARGV[5]
  end
  redis.call('HSET', KEYS[2], ARGV[1], seen)
end
redis.call('XADD', KEYS[1], '*', 'src_id', ARGV[3], 'reason', reason, 'lost', lost,
  'at_ms', ARGV[4])
if lost == '' then
  return -1
end
return lost
