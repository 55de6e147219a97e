-- One purchase, atomically. Every key shares the sale's hash tag, so this runs
-- unchanged on Redis Cluster.
-- KEYS[1] stock hash (total, sold, epoch)   KEYS[2] buyers hash (buyer -> tickets held)
-- KEYS[3] orders hash (order id -> JSON)    KEYS[4] buyer_order hash (buyer -> last order id)
-- ARGV[1] buyer ('' when anonymous)  ARGV[2] per-user limit (0 = none)
-- ARGV[3] node name                  ARGV[4] time, Unix milliseconds
-- ARGV[5] deadline, Unix milliseconds: after it the node has told the buyer 503
-- Returns {code, order id, sold}: 1 sold, 2 sold out, 3 already bought, 4 no sale,
-- 5 too late (nothing done).
-- A client library can deliver a command late (queued across a reconnect);
-- by then the buyer was told 503, so a late deduction must not sell.
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[5]) then
  return {5, '', 0}
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if not total then
  return {4, '', 0}
end
local buyer = ARGV[1]
local limit = tonumber(ARGV[2])
if buyer ~= '' and limit > 0 then
  local held = tonumber(redis.call('HGET', KEYS[2], buyer) or '0')
  if held >= limit then
    return {3, redis.call('HGET', KEYS[4], buyer) or '', 0}
  end
end
local sold = tonumber(redis.call('HGET', KEYS[1], 'sold') or '0')
-- The reference design's bug was a `>=` that let sale N+1 through; the test
-- is "one more would exceed the total".
if sold + 1 > total then
  return {2, '', sold}
end
sold = redis.call('HINCRBY', KEYS[1], 'sold', 1)
local id = (redis.call('HGET', KEYS[1], 'epoch') or '0') .. '-' .. sold
if buyer ~= '' then
  redis.call('HINCRBY', KEYS[2], buyer, 1)
  redis.call('HSET', KEYS[4], buyer, id)
end
redis.call('HSET', KEYS[3], id, cjson.encode({id = id, buyer = buyer, node = ARGV[3], time = tonumber(ARGV[4])}))
return {1, id, sold}
