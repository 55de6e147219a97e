-- A batch of purchases, atomically, in arrival order: one call carries every
-- purchase that queued on a node while its previous calls were in flight, so
-- Redis's single thread pays the call, the key lookups and the `sold` write
-- once per batch, not once per ticket. Every key shares the sale's hash tag,
-- so this runs unchanged on Redis Cluster.
-- KEYS[1] stock hash (total, sold, epoch)   KEYS[2] buyers hash (buyer -> tickets held)
-- KEYS[3] orders hash (order id -> JSON)    KEYS[4] buyer_order hash (buyer -> last order id)
-- ARGV[1] per-user limit (0 = none)  ARGV[2] time, Unix milliseconds
-- ARGV[3] deadline, Unix milliseconds: after it the node has told every
--         buyer of the batch 503
-- ARGV[4], ARGV[5], ...: pairs of buyer ('' when anonymous) and node name
-- Returns {code, order id, sold} for each purchase, in order: 1 sold,
-- 2 sold out, 3 already bought. For the whole batch, {4} no sale, or
-- {5} too late (nothing done).
-- A client library can deliver a command late (queued across a reconnect);
-- by then the buyers were told 503, so a late batch must not sell.
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[3]) then
  return {5}
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if not total then
  return {4}
end
local limit = tonumber(ARGV[1])
local time = tonumber(ARGV[2])
local sold = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0')
local before = sold
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
local out = {}
for i = 4, #ARGV, 2 do
  local buyer, node = ARGV[i], ARGV[i + 1]
  local held = 0
  if buyer ~= '' and limit > 0 then
    held = tonumber(redis.call('HGET', KEYS[2], buyer) or '0')
  end
  if buyer ~= '' and limit > 0 and held >= limit then
    out[#out + 1] = 3
    out[#out + 1] = redis.call('HGET', KEYS[4], buyer) or ''
    out[#out + 1] = 0
  elseif sold + 1 > total then
    -- The reference design's bug was a `>=` that let sale N+1 through; the
    -- test is "one more would exceed the total".
    out[#out + 1] = 2
    out[#out + 1] = ''
    out[#out + 1] = sold
  else
    sold = sold + 1
    local id = epoch .. '-' .. string.format('%d', sold)
    if buyer ~= '' then
      redis.call('HINCRBY', KEYS[2], buyer, 1)
      redis.call('HSET', KEYS[4], buyer, id)
    end
    redis.call('HSET', KEYS[3], id, cjson.encode({id = id, buyer = buyer, node = node, time = time}))
    out[#out + 1] = 1
    out[#out + 1] = id
    out[#out + 1] = sold
  end
end
if sold > before then
  redis.call('HSET', KEYS[1], 'sold', string.format('%d', sold))
end
return out
