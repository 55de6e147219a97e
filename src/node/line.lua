-- The waiting room's line (see src/balancer/waiting_room.rs): one line per
-- sale, shared by every balancer, in the sale's hash slot, decided in
-- Redis's clock like everything else of the sale.
-- KEYS[1] the sale's stock hash (read only), KEYS[2] the line (hash:
-- epoch, secret, seq, serving, carry, advanced_at), KEYS[3] the pre-queue
-- (sorted set: buyer → a random lottery number), KEYS[4] buyer → position
-- (hash), KEYS[5] the admissions log for `follow_stock` (list of
-- "at serving sales"), KEYS[6] when positions were handed out (list of
-- "seq at"), KEYS[7] the balancers that move the line (hash: id → when
-- last heard), KEYS[8] the serving mark's moves under a rate, the last
-- second's (list of "at serving", the first the mark a second ago).
-- ARGV[1] 'join' or 'advance'; ARGV[2] a fresh secret, kept only when the
-- line starts (the first balancer's); then
--   join:    ARGV[3] buyer, ARGV[4] lottery number (a random whole number
--            below 2^52, the caller's);
--   advance: ARGV[3] 'rate' or 'follow', ARGV[4] buyers a second (rate),
--            ARGV[5] pass_ttl in ms, ARGV[6] the calling balancer's id.
-- Returns {code, epoch, secret, pre-queue size, later arrivals (seq),
-- serving mark, now, opens_at, free tickets, reserved tickets, shut (0
-- selling, 1 paused, 2 closed), oldest waiter's wait in ms (advance) or the
-- buyer's position (join: 0 while in the unshuffled pre-queue), balancers
-- heard from in the last 2 s (advance; 0 for a join)};
-- code 1, or 4 when there is no sale.
--
-- A line belongs to one sale epoch: a sale started anew (`stock init
-- --force`) starts an empty line with a new secret, so its old passes and
-- places mean nothing.
local s = redis.call('HMGET', KEYS[1], 'epoch', 'total', 'sold', 'released', 'reserved',
  'opens_at', 'closes_at', 'paused', 'closed')
if not s[1] then
  return {4}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local l = redis.call('HMGET', KEYS[2], 'epoch', 'secret', 'seq', 'serving', 'carry', 'advanced_at',
  'opened')
if l[1] ~= s[1] then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8])
  redis.call('HSET', KEYS[2], 'epoch', s[1], 'secret', ARGV[2], 'seq', 0, 'serving', 0,
    'carry', '0', 'advanced_at', 0)
  l = {s[1], ARGV[2], '0', '0', '0', '0', false}
end
local total, sold = tonumber(s[2]), tonumber(s[3])
local released, reserved = tonumber(s[4] or '0'), tonumber(s[5] or '0')
local opens_at, closes_at = tonumber(s[6] or '0'), tonumber(s[7] or '0')
local shut = 0
if s[9] == '1' or (closes_at > 0 and now >= closes_at) then
  shut = 2
elseif s[8] == '1' then
  shut = 1
end
local free = math.max(total - sold, 0)
local seq, serving = tonumber(l[3]), tonumber(l[4])
-- Once the line has opened it stays open: a clock that steps back past
-- the opening (a failover to a replica whose clock is behind) must not
-- add to a pre-queue whose places were handed out.
local before_opening = opens_at > 0 and now < opens_at and l[7] ~= '1'
if opens_at > 0 and not before_opening and l[7] ~= '1' then
  redis.call('HSET', KEYS[2], 'opened', 1)
end

local function answer(last, balancers)
  return {1, s[1], l[2], redis.call('ZCARD', KEYS[3]), seq, serving, now, opens_at, free,
    reserved, shut, last, balancers or 0}
end

if ARGV[1] == 'join' then
  local buyer = ARGV[3]
  if before_opening then
    -- Every arrival before the opening has the same standing: a lottery
    -- number, ranked at the opening.
    redis.call('ZADD', KEYS[3], 'NX', ARGV[4], buyer)
    return answer(0)
  end
  local pos = redis.call('HGET', KEYS[4], buyer)
  if not pos then
    local rank = redis.call('ZRANK', KEYS[3], buyer)
    if rank then
      pos = rank + 1
    else
      seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
      pos = redis.call('ZCARD', KEYS[3]) + seq
      -- When positions were handed out, for the oldest waiter's wait: one
      -- mark a tenth of a second at most.
      local last = redis.call('LINDEX', KEYS[6], -1)
      local last_at = last and tonumber(string.match(last, ' (%d+)$')) or 0
      if now - last_at >= 100 then
        redis.call('RPUSH', KEYS[6], string.format('%d %d', seq, now))
      end
    end
    redis.call('HSET', KEYS[4], buyer, pos)
  end
  return answer(tonumber(pos))
end

-- advance: moves the serving mark by the time since the last move, in
-- Redis's clock, so any number of balancers may call it as often as they
-- like without admitting more.
local pre = redis.call('ZCARD', KEYS[3])
local joined = pre + seq
local advanced_at = tonumber(l[6])
-- Time accrues from the opening, not from the last move before it.
local from = math.max(advanced_at, opens_at)
local elapsed = math.min(math.max(now - from, 0), 1000)
if before_opening or shut ~= 0 or free == 0 then
  -- Nothing accrues while nothing can be sold: a line that waited through
  -- a pause or a sold-out spell does not rush in afterwards.
  redis.call('HSET', KEYS[2], 'advanced_at', now, 'carry', '0')
elseif ARGV[3] == 'rate' then
  local rate = tonumber(ARGV[4])
  local add = tonumber(l[5]) + rate * elapsed / 1000
  local whole = math.floor(add)
  -- N a second over any second, not on average: a move admits the time
  -- since the previous one, which may have begun before the second that
  -- ends now, so the mark may move at most N past where it stood a second
  -- ago (the first entry: the last move at least a second old, or the
  -- mark before any move was logged).
  if redis.call('LLEN', KEYS[8]) == 0 then
    redis.call('RPUSH', KEYS[8], string.format('0 %d', serving))
  end
  local second = redis.call('LINDEX', KEYS[8], 1)
  while second and tonumber(string.match(second, '^(%d+) ')) <= now - 1000 do
    redis.call('LPOP', KEYS[8])
    second = redis.call('LINDEX', KEYS[8], 1)
  end
  local base = tonumber(string.match(redis.call('LINDEX', KEYS[8], 0), ' (%d+)$'))
  local room = math.max(base + rate - serving, 0)
  local carry = add - whole
  if whole > room then
    -- Held back by the window: what accrued is kept for the next moves
    -- (up to a fifth of a second's worth), so the line keeps to the rate
    -- as closely as the window allows, and no more.
    carry = math.min(add - room, math.max(rate / 5, 1))
    whole = room
  end
  local next_serving = math.min(serving + whole, joined)
  if next_serving == joined then
    carry = 0
  end
  if next_serving ~= serving then
    redis.call('RPUSH', KEYS[8], string.format('%d %d', now, next_serving))
  end
  serving = next_serving
  redis.call('HSET', KEYS[2], 'serving', serving, 'carry', string.format('%.6f', carry),
    'advanced_at', now)
else
  -- The rate's window starts afresh if the admit rule turns to a rate.
  redis.call('DEL', KEYS[8])
  -- follow_stock: buyers admitted within the last pass_ttl who have not
  -- bought yet are "in flight"; admit until they are about as many as the
  -- free tickets plus a margin (a tenth of the tickets free or reserved,
  -- at least 5), so that buyers who give up or whose purchase fails do
  -- not leave tickets unsold, and nobody is admitted for a ticket held by
  -- a reservation (it is admitted for when it comes back).
  local ttl = tonumber(ARGV[5])
  local sales = sold + released
  if redis.call('LLEN', KEYS[5]) == 0 then
    -- The mark before any admission: the first ones count as in flight.
    redis.call('RPUSH', KEYS[5], string.format('%d %d %d', now, serving, sales))
  end
  local base_serving, base_sales = serving, sales
  local first = redis.call('LINDEX', KEYS[5], 0)
  while first do
    local at, sv, sl = string.match(first, '^(%d+) (%d+) (%d+)$')
    base_serving, base_sales = tonumber(sv), tonumber(sl)
    local second = redis.call('LINDEX', KEYS[5], 1)
    local second_at = second and tonumber(string.match(second, '^(%d+) ')) or nil
    if second_at and second_at <= now - ttl then
      redis.call('LPOP', KEYS[5])
      first = second
    else
      first = nil
    end
  end
  local in_flight = math.max((serving - base_serving) - (sales - base_sales), 0)
  local margin = math.max(5, math.ceil((free + reserved) / 10))
  local add = math.max(free + margin - in_flight, 0)
  local next_serving = math.min(serving + add, joined)
  local last = redis.call('LINDEX', KEYS[5], -1)
  local last_at = last and tonumber(string.match(last, '^(%d+) ')) or 0
  if next_serving ~= serving or now - last_at >= 1000 then
    redis.call('RPUSH', KEYS[5], string.format('%d %d %d', now, next_serving, sales))
  end
  serving = next_serving
  redis.call('HSET', KEYS[2], 'serving', serving, 'advanced_at', now)
end

-- The oldest waiter: the first position not yet served.
local oldest = 0
if serving < joined and not before_opening then
  if serving < pre then
    oldest = now - opens_at
  else
    local waiting_seq = serving - pre + 1
    local mark = redis.call('LINDEX', KEYS[6], 0)
    while mark do
      local m_seq, m_at = string.match(mark, '^(%d+) (%d+)$')
      local nxt = redis.call('LINDEX', KEYS[6], 1)
      local n_seq = nxt and tonumber(string.match(nxt, '^(%d+) ')) or nil
      if n_seq and n_seq <= waiting_seq then
        redis.call('LPOP', KEYS[6])
        mark = nxt
      else
        oldest = now - tonumber(m_at)
        mark = nil
      end
    end
  end
end
-- The balancers moving the line, so each lets through its share of the
-- admit rate.
redis.call('HSET', KEYS[7], ARGV[6], now)
local heard = redis.call('HGETALL', KEYS[7])
local live = 0
for i = 1, #heard, 2 do
  if tonumber(heard[i + 1]) >= now - 2000 then
    live = live + 1
  else
    redis.call('HDEL', KEYS[7], heard[i])
  end
end
return answer(math.max(oldest, 0), live)
