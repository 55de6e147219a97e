-- Writes a sale's total. Refuses (returns 0) when the sale has started, unless
-- ARGV[3] is '1' (force), which first wipes total, sold, buyers and orders.
-- KEYS as in deduct.lua. ARGV[1] total, ARGV[2] epoch, ARGV[3] force.
local started = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0') > 0
  or redis.call('HLEN', KEYS[3]) > 0
if started and ARGV[3] ~= '1' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], 'total', ARGV[1], 'sold', 0, 'epoch', ARGV[2])
return 1
