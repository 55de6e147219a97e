-- A batch of purchases, atomically, in arrival order: one call carries every
-- purchase that queued on a node while its previous calls were in flight, so
-- Redis's single thread pays the call and the sale's lookups once per batch,
-- not once per ticket. Every key shares the sale's hash tag, so this runs
-- unchanged on Redis Cluster.
-- KEYS[1] stock hash (total, sold, epoch)   KEYS[2] buyers hash (buyer -> tickets held)
-- KEYS[3] orders hash (order id -> JSON)    KEYS[4] buyer_order hash (buyer -> last order id)
-- ARGV[1] per-user limit (0 = none)  ARGV[2] time, Unix milliseconds
-- ARGV[3], ARGV[4], ARGV[5], ...: triples of buyer ('' when anonymous), node
-- name, and deadline (Unix milliseconds: from then on the node has told that
-- buyer 503).
-- Returns {code, order id, sold} for each purchase, in order: 1 sold,
-- 2 sold out, 3 already bought, 5 too late (nothing done for it); or {4}
-- for the whole batch when there is no sale.
-- A client library can deliver a command late (queued across a reconnect);
-- by then its buyers were told 503, so a late purchase must not sell.
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if not total then
  return {4}
end
local limit = tonumber(ARGV[1])
local time = tonumber(ARGV[2])
local sold = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or '0'
local out = {}
-- One answer per purchase: its code, its order id ('' when none), and the
-- sold count it saw.
local function answer(code, id, count)
  out[#out + 1] = code
  out[#out + 1] = id
  out[#out + 1] = count
end
for i = 3, #ARGV, 3 do
  local buyer, node, deadline = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local limited = buyer ~= '' and limit > 0
  if now >= deadline then
    answer(5, '', 0)
  elseif limited and tonumber(redis.call('HGET', KEYS[2], buyer) or '0') >= limit then
    answer(3, redis.call('HGET', KEYS[4], buyer) or '', 0)
  elseif sold + 1 > total then
    -- The reference design's bug was a `>=` that let sale N+1 through; the
    -- test is "one more would exceed the total".
    answer(2, '', sold)
  else
    -- `sold` is written first, sale by sale: Redis does not roll a script
    -- back, so if a later write fails, what was sold is still counted and
    -- no order id is handed out twice.
    sold = redis.call('HINCRBY', KEYS[1], 'sold', 1)
    local id = epoch .. '-' .. string.format('%d', sold)
    if buyer ~= '' then
      redis.call('HINCRBY', KEYS[2], buyer, 1)
      redis.call('HSET', KEYS[4], buyer, id)
    end
    redis.call('HSET', KEYS[3], id, cjson.encode({id = id, buyer = buyer, node = node, time = time}))
    answer(1, id, sold)
  end
end
return out
