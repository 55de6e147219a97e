-- A consistent snapshot of the sale for `stock show` and `stock audit`.
-- KEYS as in deduct.lua. Returns {exists, total, sold, orders, buyers,
-- tickets held by named buyers, the most any one buyer holds, epoch}.
local total = redis.call('HGET', KEYS[1], 'total')
if not total then
  return {0, 0, 0, redis.call('HLEN', KEYS[3]), redis.call('HLEN', KEYS[2]), 0, 0, ''}
end
local held, most = 0, 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  local n = tonumber(v)
  held = held + n
  if n > most then most = n end
end
return {1, tonumber(total), tonumber(redis.call('HGET', KEYS[1], 'sold') or '0'),
  redis.call('HLEN', KEYS[3]), redis.call('HLEN', KEYS[2]), held, most,
  redis.call('HGET', KEYS[1], 'epoch') or ''}
