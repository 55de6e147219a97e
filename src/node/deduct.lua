-- A batch of entries from one node process, decided atomically in arrival
-- order: one call carries every purchase (and lease request) that queued while
-- the process's previous calls were in flight, so Redis's single thread pays
-- the call and the sale's lookups once per batch, not once per ticket. Every
-- key shares the sale's hash tag, so this runs unchanged on Redis Cluster.
--
-- KEYS[1] stock hash (total, sold, epoch, limit, held, most, seq, barriers,
--         pay_within, reserved, paid, released, stream_max, stream,
--         events_from, events_base)
-- KEYS[2] buyers hash (buyer -> tickets held)
-- KEYS[3] orders hash (order id -> JSON)
-- KEYS[4] buyer_order hash (buyer -> last order id)
-- KEYS[5] leases hash (holder -> "units:expires_ms")
-- KEYS[6] keys hash (Idempotency-Key -> "order id buyer", written once
--         with the order: a replay reads the order's state from the order;
--         not for a balancer's key that its buyer's one order keeps, below)
-- KEYS[7] due sorted set (reserved order id -> pay_by, Redis ms)
-- KEYS[8] events stream (with a payment window, every order's creation and
--         state change; with `stream` = 1, every final sale too)
-- ARGV[1] lease lifetime in milliseconds
-- Then groups of 6: kind ('p' purchase, 'm' purchase whose key a balancer
-- made, 'l' lease request, 'r' lease given
-- back: a node that stops selling the sale), holder (a node
-- process's lease name), node name, buyer ('' when anonymous), Idempotency-Key
-- ('' when none), and for 'p' the deadline (Redis milliseconds: from then on
-- the buyer has been told 503), or "deadline:quantity:units" for a purchase
-- of several tickets (units: how many the node took from its own lease for
-- it), or for 'l' "units wanted:deadline" (for 'r': nothing read).
--
-- Returns {0, epoch, limit, sold, total, released, pay_within, opens_at,
-- closes_at, paused (0/1), closed (0/1)} then, per
-- entry, {code, order id, count, units the holder's lease has left, pay_by
-- (0 when the sale is final), order state ('' when final)}:
--   1 sold (count = the ticket's number; of several, the last's: the order
--     holds that many tickets, numbered up to it, and its id ends with it)
--   2 sold out
--   3 already bought (order = the last one)   5 too late: nothing done
--   6 this key already bought (order = its, with its state now)
--   7 this key belongs to another buyer
--   8 lease answer (count = units granted; 0 for a lease given back)
--   9 no buyer named, and the sale's limit needs one (nothing done)
--  10 the sale does not sell now (order = why: 'not_open', 'closed' or
--     'paused'; count = when it opens or closed, Unix ms); also for a
--     lease request. A key's replay and a holder's `already bought` are
--     still answered: they sell nothing.
--  11 the purchase would take the buyer over the limit (count = tickets
--     they may still buy; nothing done)
--  12 this key bought an order of another quantity (order = its, count =
--     its quantity; nothing done)
--  13 fewer tickets left than asked (count = how many are left; nothing
--     done: a purchase is all or nothing)
-- or {4} for the whole batch when there is no sale.
--
-- The sale's rule is `sold <= total`, and leases never promise more than is
-- left: `sold + units leased <= total`. A lease is a node's right to send
-- that many purchases without asking first; it is not a reservation that
-- can strand a buyer: a purchase sells whenever `sold < total`, taking its
-- unit from its own lease, else from what nobody holds, else from the
-- largest other lease. So the sale sells exactly its total, whichever nodes
-- the buyers reach, and a lease of a node that died comes back by itself
-- (it expires unless renewed, and can be taken from before that).
--
-- With a payment window (`pay_within` > 0) a sale is a reservation: the
-- order is `reserved` until `pay_by`, and `orders.lua` pays, cancels or
-- expires it. `sold` counts tickets taken (reserved + paid) and goes down
-- when one comes back; `seq` only grows, so an order id is never reused.
--
-- An order may hold several tickets (`quantity`, numbered up to the one
-- its id ends with): every counter (`sold`, `seq`, `reserved`, `paid`,
-- `released`, a buyer's count) counts tickets, and `extra` (with
-- `extra_paid` and `extra_released` in orders.lua) the tickets beyond
-- the first of each order, so that the audit can count orders too.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stock = redis.call('HMGET', KEYS[1], 'total', 'sold', 'epoch', 'limit', 'seq',
  'pay_within', 'released', 'stream_max', 'stream', 'opens_at', 'closes_at', 'paused', 'closed')
local total = tonumber(stock[1])
if not total then
  return {4}
end
local sold = tonumber(stock[2] or '0')
local epoch = stock[3] or '0'
local limit = tonumber(stock[4] or '0')
-- A sale written before `seq` existed numbered its orders by `sold`.
-- (and a node of that version still numbers them so: never go below it).
local seq = math.max(tonumber(stock[5] or '0'), sold)
local pay_within = tonumber(stock[6] or '0')
local released = tonumber(stock[7] or '0')
local stream_max = stock[8] or '100000'
-- Final sales streamed too (`[sale] stream`): an order service hears of
-- every order, at the price of one XADD per sale.
local stream_final = stock[9] == '1'
local ttl = tonumber(ARGV[1])
-- Why nothing sells now, in Redis's clock: after the closing (`stock
-- close` sets `closed`, which no clock undoes), before the opening, or
-- paused by the operator (`spike stock pause`). A closing comes first: a
-- sale closed before it opened is closed. (`Moments::shut_at` in Rust.)
local opens_at, closes_at = tonumber(stock[10] or '0'), tonumber(stock[11] or '0')
local paused, closed = stock[12] == '1', stock[13] == '1'
local shut, shut_at = nil, 0
if closed or (closes_at > 0 and now >= closes_at) then
  shut, shut_at = 'closed', closes_at
elseif now < opens_at then
  shut, shut_at = 'not_open', opens_at
elseif paused then
  shut = 'paused'
end

-- Leases, read once: a handful of fields, one per live node process.
local leases, expiry, leased = {}, {}, 0
local raw = redis.call('HGETALL', KEYS[5])
for i = 1, #raw, 2 do
  local units, expires = string.match(raw[i + 1], '^(%d+):(%d+)$')
  units, expires = tonumber(units), tonumber(expires)
  if units and expires > now then
    leases[raw[i]] = units
    expiry[raw[i]] = expires
    leased = leased + units
  else
    redis.call('HDEL', KEYS[5], raw[i])
  end
end
-- Holders whose lease changed; those that spoke in this batch are renewed,
-- one that only lost units keeps its expiry (a dead node's lease must run out).
local touched = {}
local function renew(holder)
  touched[holder] = true
  expiry[holder] = now + ttl
end

-- One unit for `holder`'s sale: its own lease, else the free stock, else
-- the largest other lease. Only called while sold < total, and then some
-- unit exists (sold + leased <= total). (A purchase of several takes its
-- units in the loop below.)
local function take_unit(holder)
  local own = leases[holder] or 0
  if own > 0 then
    leases[holder] = own - 1
    leased = leased - 1
  elseif total - sold - leased <= 0 then
    local victim, most = nil, 0
    for h, u in pairs(leases) do
      if u > most then victim, most = h, u end
    end
    if victim then
      leases[victim] = most - 1
      leased = leased - 1
      touched[victim] = true
    end
  end
  renew(holder)
end


-- Up to `want` units for `holder`: half of what is free at most, so that the
-- last tickets are not all handed to one node; when nothing is free, half
-- of the largest other lease (the buyers are here, not there).
local function grant(holder, want)
  renew(holder)
  if want <= 0 or sold >= total then
    return 0
  end
  local free = total - sold - leased
  local g = 0
  if free > 0 then
    g = math.min(want, math.max(1, math.floor(free / 2)))
  else
    local victim, most = nil, 0
    for h, u in pairs(leases) do
      if h ~= holder and u > most then victim, most = h, u end
    end
    if victim then
      g = math.min(want, math.ceil(most / 2))
      leases[victim] = most - g
      touched[victim] = true
      leased = leased - g
    end
  end
  leases[holder] = (leases[holder] or 0) + g
  leased = leased + g
  return g
end

local out = {0, epoch, limit, 0, total, released, pay_within, opens_at, closes_at,
  paused and 1 or 0, closed and 1 or 0}
local function answer(code, id, count, holder, pay_by, state)
  out[#out + 1] = code
  out[#out + 1] = id
  out[#out + 1] = count
  out[#out + 1] = leases[holder] or 0
  out[#out + 1] = pay_by or 0
  out[#out + 1] = state or ''
end

local held_added, most = 0, 0
for i = 2, #ARGV, 6 do
  local kind, holder, node, buyer, key = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if kind == 'r' then
    -- A node that drops its state of this sale (idle) gives its lease back:
    -- the units are free now, not once the lease runs out. Whatever the
    -- sale's moment: giving back sells nothing.
    local units = leases[holder] or 0
    leased = leased - units
    leases[holder] = 0
    touched[holder] = true
    answer(8, '', 0, holder)
  elseif kind == 'l' then
    local want, deadline = string.match(ARGV[i + 5], '^(%d+):(%d+)$')
    if now >= tonumber(deadline) then
      answer(5, '', 0, holder)
    elseif shut then
      answer(10, shut, shut_at, holder)
    else
      answer(8, '', grant(holder, tonumber(want)), holder)
    end
  else
    -- A plain number for one ticket (the common path: nothing to parse).
    local deadline, quantity, brought = tonumber(ARGV[i + 5]), 1, 0
    if not deadline then
      deadline, quantity, brought = string.match(ARGV[i + 5], '^(%d+):(%d+):(%d+)$')
      deadline, quantity, brought = tonumber(deadline), math.max(1, tonumber(quantity)),
        tonumber(brought)
    end
    local limited = buyer ~= '' and limit > 0
    -- A key a balancer made ('m') is unique and sent again only by that
    -- balancer's retry. In a final sale with a limit of one, its buyer's
    -- one order (never given back, and naming its key) is the key's whole
    -- record: the key gets no entry of its own in KEYS[6], one write and
    -- one entry fewer a sale, and a retry finds its order through the
    -- buyer. Where orders come back or a buyer may hold several, the
    -- buyer's last order need not be the key's: those keep their entry.
    local by_buyer = kind == 'm' and limit == 1 and pay_within == 0 and buyer ~= ''
      and quantity == 1
    -- The buyer's tickets where already known (else read when needed).
    local holds
    local seen = false
    if now < deadline and key ~= '' then
      if by_buyer then
        local last = redis.call('HGET', KEYS[4], buyer)
        local record = last and redis.call('HGET', KEYS[3], last)
        if record and cjson.decode(record).key == key then
          seen = last .. ' ' .. buyer
        end
        -- In a final sale a buyer with an order holds it for good: one
        -- ticket (the limit) if they have a last order, none if not. The
        -- lookup above is the limit's too: no second read.
        holds = last and 1 or 0
      else
        seen = redis.call('HGET', KEYS[6], key)
      end
    end
    local seen_order, seen_buyer, seen_state, seen_pay_by, seen_quantity
    if seen then
      -- "order buyer" (a sale written before this version may have the
      -- state and deadline after them: they are not read). With a
      -- payment window the order's state and deadline are the order's
      -- own, read only on a replay, so that neither a sale nor a
      -- payment, cancel or expiry writes the key's entry a second time.
      seen_order, seen_buyer = string.match(seen, '^(%S+) (%S*)')
      -- "order buyer quantity" for an order of several tickets.
      seen_quantity = tonumber(string.match(seen, '^%S+ %S* (%d+)$') or '1')
      seen_state, seen_pay_by = '', 0
      if pay_within > 0 and seen_order then
        local record = redis.call('HGET', KEYS[3], seen_order)
        if record then
          local o = cjson.decode(record)
          seen_state, seen_pay_by = o.state or '', tonumber(o.pay_by) or 0
        end
      end
    end
    if now >= deadline then
      -- A client library can deliver a command late (queued across a
      -- reconnect); by then the buyer was told 503, so it must not sell.
      answer(5, '', 0, holder)
    elseif buyer == '' and limit > 0 then
      -- A node that does not know the stored limit yet (it goes by its
      -- file until the first answer) must not sell to nobody in particular.
      answer(9, '', 0, holder)
    elseif seen then
      if seen_buyer == buyer and seen_quantity ~= quantity then
        -- A retry asks for what the first request asked: the key names
        -- that purchase, which this one is not.
        answer(12, seen_order, seen_quantity, holder)
      elseif seen_buyer == buyer then
        local pay_by = seen_pay_by
        -- Past its deadline, a reservation is expired whether or not a
        -- sweep has run yet (as orders.lua treats it).
        if seen_state == 'reserved' and now >= pay_by then seen_state = 'expired' end
        answer(6, seen_order, tonumber(string.match(seen_order, '(%d+)$')) or 0, holder,
          pay_by, seen_state)
      else
        answer(7, '', 0, holder)
      end
    elseif limited and (holds or tonumber(redis.call('HGET', KEYS[2], buyer) or '0')) >= limit then
      answer(3, redis.call('HGET', KEYS[4], buyer) or '', 0, holder)
    elseif shut then
      answer(10, shut, shut_at, holder)
    elseif sold + 1 > total then
      -- The reference design's bug was a `>=` that let sale N+1 through;
      -- the test is "one more would exceed the total".
      answer(2, '', sold, holder)
    elseif limited and quantity > 1
        and tonumber(redis.call('HGET', KEYS[2], buyer) or '0') + quantity > limit then
      -- (After sold out: once nothing is left, a buyer under the limit
      -- hears `sold_out`, as a sold-out node answers from memory.)
      answer(11, '', limit - tonumber(redis.call('HGET', KEYS[2], buyer) or '0'), holder)
    elseif sold + quantity > total then
      -- All or nothing: tickets remain, fewer than asked. Not sold out.
      answer(13, '', total - sold, holder)
    else
      if quantity == 1 then
        take_unit(holder)
      else
        -- `quantity` units: the `brought` the node took from its own lease,
        -- then the free stock, then the largest other leases, then the rest
        -- of its own (a node sends a purchase of several with what its
        -- lease had). Here, not in a function: a closure made on every
        -- call costs every batch, and few purchases take this path. Since
        -- sold + quantity <= total and sold + leased <= total, the units
        -- exist.
        local own = leases[holder] or 0
        local k = math.min(own, brought, quantity)
        local need = quantity - k
        local free = total - sold - leased
        own = own - k
        leased = leased - k
        if need > 0 and free > 0 then
          need = need - math.min(free, need)
        end
        while need > 0 do
          local victim, most = nil, 0
          for h, u in pairs(leases) do
            if h ~= holder and u > most then victim, most = h, u end
          end
          if not victim then break end
          local g = math.min(most, need)
          leases[victim] = most - g
          leased = leased - g
          touched[victim] = true
          need = need - g
        end
        if need > 0 then
          local g = math.min(own, need)
          own = own - g
          leased = leased - g
        end
        leases[holder] = own
        renew(holder)
      end
      -- `sold` is written first, sale by sale: Redis does not roll a script
      -- back, so if a later write fails, what was sold is still counted and
      -- no order id is handed out twice.
      sold = redis.call('HINCRBY', KEYS[1], 'sold', quantity)
      if quantity > 1 then
        redis.call('HINCRBY', KEYS[1], 'extra', quantity - 1)
      end
      -- A final sale never gives a ticket back, so its count is its
      -- sequence (readers take max(seq, sold)); only a sale with a window,
      -- where `sold` goes down, keeps `seq` apart. The default path stays
      -- as cheap as before.
      local pay_by, state = 0, ''
      if pay_within > 0 then
        seq = seq + quantity
        redis.call('HSET', KEYS[1], 'seq', seq)
        pay_by, state = now + pay_within, 'reserved'
      else
        seq = sold
      end
      local id = epoch .. '-' .. string.format('%d', seq)
      if state ~= '' then
        redis.call('ZADD', KEYS[7], pay_by, id)
        redis.call('HINCRBY', KEYS[1], 'reserved', quantity)
      end
      if buyer ~= '' then
        local held = redis.call('HINCRBY', KEYS[2], buyer, quantity)
        redis.call('HSET', KEYS[4], buyer, id)
        held_added = held_added + quantity
        if held > most then most = held end
      end
      if key ~= '' and not by_buyer then
        if quantity > 1 then
          redis.call('HSET', KEYS[6], key, id .. ' ' .. buyer .. ' ' .. string.format('%d', quantity))
        else
          redis.call('HSET', KEYS[6], key, id .. ' ' .. buyer)
        end
      end
      local order = {id = id, buyer = buyer, node = node, time = now}
      if key ~= '' then order.key = key end
      if quantity > 1 then order.quantity = quantity end
      if state ~= '' then
        order.state = state
        order.pay_by = pay_by
      end
      redis.call('HSET', KEYS[3], id, cjson.encode(order))
      -- The hand-off to an order or payment service, in the same step.
      -- The key goes too (when there is one): a sold-out node learns from
      -- the stream which keys bought, without a lookup per order. An order
      -- of several tickets says how many (`quantity`, absent for one).
      if quantity > 1 and (state ~= '' or stream_final) then
        local args = {'XADD', KEYS[8], 'MAXLEN', '~', stream_max, '*',
          'type', state ~= '' and state or 'sold', 'order', id, 'buyer', buyer, 'node', node,
          'at', string.format('%d', now)}
        if state ~= '' then
          args[#args + 1] = 'pay_by'
          args[#args + 1] = string.format('%d', pay_by)
        end
        if key ~= '' then
          args[#args + 1] = 'key'
          args[#args + 1] = key
        end
        args[#args + 1] = 'quantity'
        args[#args + 1] = string.format('%d', quantity)
        redis.call(unpack(args))
      elseif state ~= '' then
        if key ~= '' then
          redis.call('XADD', KEYS[8], 'MAXLEN', '~', stream_max, '*', 'type', state,
            'order', id, 'buyer', buyer, 'node', node, 'at', string.format('%d', now),
            'pay_by', string.format('%d', pay_by), 'key', key)
        else
          redis.call('XADD', KEYS[8], 'MAXLEN', '~', stream_max, '*', 'type', state,
            'order', id, 'buyer', buyer, 'node', node, 'at', string.format('%d', now),
            'pay_by', string.format('%d', pay_by))
        end
      elseif stream_final then
        if key ~= '' then
          redis.call('XADD', KEYS[8], 'MAXLEN', '~', stream_max, '*', 'type', 'sold',
            'order', id, 'buyer', buyer, 'node', node, 'at', string.format('%d', now),
            'key', key)
        else
          redis.call('XADD', KEYS[8], 'MAXLEN', '~', stream_max, '*', 'type', 'sold',
            'order', id, 'buyer', buyer, 'node', node, 'at', string.format('%d', now))
        end
      end
      answer(1, id, seq, holder, pay_by, state)
    end
  end
end

-- A lease lives while its node keeps calling; one with no units left is
-- dropped, so the hash holds only the nodes that hold stock.
for h in pairs(touched) do
  local units = leases[h] or 0
  if units > 0 then
    redis.call('HSET', KEYS[5], h, string.format('%d:%d', units, expiry[h]))
  else
    redis.call('HDEL', KEYS[5], h)
  end
end
if held_added > 0 then
  redis.call('HINCRBY', KEYS[1], 'held', held_added)
  if most > tonumber(redis.call('HGET', KEYS[1], 'most') or '0') then
    redis.call('HSET', KEYS[1], 'most', most)
  end
end
out[4] = sold
return out
