-- Writes a sale. Refuses (returns {0}) when the sale has started, unless
-- ARGV[3] is '1' (force), which first wipes everything of the old sale
-- (its orders, deadlines and event stream too).
-- KEYS as in deduct.lua. ARGV[1] total, ARGV[2] per-user limit, ARGV[3]
-- force, ARGV[4] payment window in ms (0: purchases are final), ARGV[5]
-- the event stream's approximate length bound.
-- Returns {1, epoch}.
--
-- The epoch (the first part of every order id, and how running nodes learn
-- of a reset) is Redis's clock in milliseconds, and always above the old
-- one: two resets in the same millisecond, or a caller whose clock is
-- behind, can never reuse an order id.
local started = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0') > 0
  or redis.call('HLEN', KEYS[3]) > 0
if started and ARGV[3] ~= '1' then
  return {0}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local epoch = math.max(now, tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0') + 1)
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', 0, 'epoch', string.format('%d', epoch),
  'limit', ARGV[2], 'held', 0, 'most', 0, 'seq', 0, 'pay_within', ARGV[4], 'reserved', 0,
  'paid', 0, 'released', 0, 'stream_max', ARGV[5])
return {1, epoch}
