-- Writes a sale. Refuses (returns {0}) when the sale has started, unless
-- ARGV[3] is '1' (force), which first wipes everything of the old sale
-- (its orders, buyers, leases, keys and deadlines) but its event stream.
-- KEYS as in deduct.lua. ARGV[1] total, ARGV[2] per-user limit, ARGV[3]
-- force, ARGV[4] payment window in ms (0: purchases are final), ARGV[5]
-- the event stream's approximate length bound, ARGV[6] '1' when final
-- sales are streamed too (`[sale] stream`), ARGV[7] when the sale opens
-- and ARGV[8] when it closes (Unix ms in Redis's clock; 0: no such moment).
-- Returns {1, epoch}.
--
-- The epoch (the first part of every order id, and how running nodes learn
-- of a reset) is Redis's clock in milliseconds, and always above the old
-- one: two resets in the same millisecond, or a caller whose clock is
-- behind, can never reuse an order id.
--
-- The stream outlives the sale it was written for: an order service
-- reading it (its consumer group, its place in the stream, what it has
-- not acknowledged) must not lose events of the old sale it had not read
-- yet, and must learn that the sale it followed is gone. Replacing a sale
-- appends a `reset` event: the old and new epochs, and the reservations
-- that were still open (never paid, cancelled or expired, and now never
-- will be: their orders are gone with the old sale), counted in `voided`
-- and listed in `voided_orders` when there are at most VOIDED_LISTED.
local VOIDED_LISTED = 100
local old = redis.call('HMGET', KEYS[1], 'total', 'sold', 'epoch', 'stream_max')
local started = tonumber(old[2] or '0') > 0 or redis.call('HLEN', KEYS[3]) > 0
if started and ARGV[3] ~= '1' then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old_epoch = old[3] or '0'
local epoch = math.max(now, tonumber(old_epoch) + 1)
local streams = tonumber(ARGV[4]) > 0 or ARGV[6] == '1'
local open = redis.call('ZCARD', KEYS[7])
local voided = {}
if open > 0 and open <= VOIDED_LISTED then
  voided = redis.call('ZRANGE', KEYS[7], 0, -1)
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7])
local has_stream = redis.call('EXISTS', KEYS[8]) == 1
if old[1] and (has_stream or streams) then
  local args = {'XADD', KEYS[8], 'MAXLEN', '~', ARGV[5], '*', 'type', 'reset',
    'epoch', string.format('%d', epoch), 'old_epoch', old_epoch, 'at', string.format('%d', now),
    'voided', string.format('%d', open)}
  if #voided > 0 then
    args[#args + 1] = 'voided_orders'
    args[#args + 1] = table.concat(voided, ' ')
  end
  redis.call(unpack(args))
  has_stream = true
end
-- Where this sale's events begin, for `stock audit`: after the last entry
-- now, and how many the stream had been given by then (Redis 7's
-- `entries-added`; unknown before, and then the audit counts nothing).
local events_from, events_base = '0-0', ''
if has_stream then
  local info = redis.call('XINFO', 'STREAM', KEYS[8])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then events_from = info[i + 1] end
    if info[i] == 'entries-added' then events_base = string.format('%d', info[i + 1]) end
  end
else
  events_base = '0'
end
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', 0, 'epoch', string.format('%d', epoch),
  'limit', ARGV[2], 'held', 0, 'most', 0, 'seq', 0, 'pay_within', ARGV[4], 'reserved', 0,
  'paid', 0, 'released', 0, 'stream_max', ARGV[5], 'stream', ARGV[6] == '1' and 1 or 0,
  'events_from', events_from, 'opens_at', ARGV[7] or '0', 'closes_at', ARGV[8] or '0',
  'controls', 0)
if events_base ~= '' then
  redis.call('HSET', KEYS[1], 'events_base', events_base)
end
return {1, epoch}
