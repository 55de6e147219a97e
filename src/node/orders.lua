-- An order's life after its purchase, when the sale has a payment window
-- (an order of several tickets lives as one: its tickets are paid,
-- cancelled or expired together, and all come back):
-- `reserved` -> `paid` | `cancelled` | `expired`, the three end states
-- final. Every transition is a compare-and-set from `reserved` in this one
-- script, together with what it implies: a ticket that comes back is
-- returned to the stock and to its buyer's allowance (so they may buy
-- again), its deadline entry goes, and the change is appended to the
-- sale's event stream. Redis runs the script alone, so a payment racing an
-- expiry (or a cancel, or another node's sweep) has exactly one winner.
--
-- Deadlines are in Redis's clock: an order is expired from `pay_by` on,
-- whether or not a sweep has run yet (a payment then loses).
--
-- KEYS as in deduct.lua.
-- ARGV[1] 'pay' | 'cancel' | 'get': ARGV[2] order id, ARGV[3] the buyer
--   asking ('' when none; '*' the payment service, whose signature the node
--   checked: it acts on any buyer's order), ARGV[4] a payment reference
--   ('' when none).
--   Returns the header (as deduct.lua's: {0, epoch, limit, sold, total,
--   released, pay_within, opens_at, closes_at, paused, closed}) then
--   {code, order JSON}:
--   1 done (or already so: paying twice is one payment)
--   2 not possible from the order's state (the JSON says which)
--   3 the order is final: the sale has no payment window
--   0 no such order            5 the order is another buyer's
-- ARGV[1] 'sweep': ARGV[2] most orders to look at. Expires the reserved
--   orders whose deadline has passed, oldest first. Returns the header then
--   {orders expired, 1 when more are due else 0}.
-- {4} when there is no sale.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local stock = redis.call('HGET', KEYS[1], 'total')
if not stock then
  return {4}
end

local function stream_max()
  return redis.call('HGET', KEYS[1], 'stream_max') or '100000'
end

-- The order's record after a change (its key's entry names the order
-- only: a replay reads the state from here, so it is not written again).
local function save(id, o)
  redis.call('HSET', KEYS[3], id, cjson.encode(o))
end

-- The tickets an order holds (`quantity`, absent for one).
local function quantity(o)
  return tonumber(o.quantity) or 1
end

local function append(kind, id, o, extra)
  local args = {'XADD', KEYS[8], 'MAXLEN', '~', stream_max(), '*', 'type', kind, 'order', id,
    'buyer', o.buyer or '', 'node', o.node or '', 'at', string.format('%d', now)}
  if extra then
    args[#args + 1] = 'payment_ref'
    args[#args + 1] = extra
  end
  if quantity(o) > 1 then
    args[#args + 1] = 'quantity'
    args[#args + 1] = string.format('%d', quantity(o))
  end
  redis.call(unpack(args))
end

-- The order's tickets go back, all of them: that many fewer taken, the
-- buyer's count down by as many, the deadline entry gone. (`extra_released`:
-- the tickets beyond one per order, so the audit counts orders too.)
local function release(id, o, state)
  local n = quantity(o)
  o.state = state
  o[state .. '_at'] = now
  save(id, o)
  redis.call('ZREM', KEYS[7], id)
  redis.call('HINCRBY', KEYS[1], 'sold', -n)
  redis.call('HINCRBY', KEYS[1], 'reserved', -n)
  redis.call('HINCRBY', KEYS[1], 'released', n)
  if n > 1 then
    redis.call('HINCRBY', KEYS[1], 'extra_released', n - 1)
  end
  if o.buyer and o.buyer ~= '' then
    if redis.call('HINCRBY', KEYS[2], o.buyer, -n) <= 0 then
      redis.call('HDEL', KEYS[2], o.buyer)
    end
    redis.call('HINCRBY', KEYS[1], 'held', -n)
  end
  append(state, id, o)
end

local function expire_if_due(id, o)
  if o.state == 'reserved' and now >= tonumber(o.pay_by) then
    release(id, o, 'expired')
  end
end

local function header()
  local s = redis.call('HMGET', KEYS[1], 'total', 'sold', 'epoch', 'limit', 'released',
    'pay_within', 'opens_at', 'closes_at', 'paused', 'closed')
  return {0, s[3] or '0', tonumber(s[4] or '0'), tonumber(s[2] or '0'), tonumber(s[1]),
    tonumber(s[5] or '0'), tonumber(s[6] or '0'), tonumber(s[7] or '0'), tonumber(s[8] or '0'),
    s[9] == '1' and 1 or 0, s[10] == '1' and 1 or 0}
end

local op = ARGV[1]
if op == 'sweep' then
  local most = tonumber(ARGV[2])
  local due = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', now, 'LIMIT', 0, most)
  local expired = 0
  for _, id in ipairs(due) do
    local raw = redis.call('HGET', KEYS[3], id)
    local o = raw and cjson.decode(raw)
    if o and o.state == 'reserved' then
      expire_if_due(id, o)
      expired = expired + 1
    else
      -- Paid or released already: the entry is stale, not a deadline.
      redis.call('ZREM', KEYS[7], id)
    end
  end
  local out = header()
  out[#out + 1] = expired
  out[#out + 1] = #due == most and 1 or 0
  return out
end

local id, asker, ref = ARGV[2], ARGV[3], ARGV[4]
local raw = redis.call('HGET', KEYS[3], id)
local out = header()
if not raw then
  out[#out + 1] = 0
  out[#out + 1] = ''
  return out
end
local o = cjson.decode(raw)
local code = 1
if o.buyer and o.buyer ~= '' and o.buyer ~= asker and asker ~= '*' then
  out[#out + 1] = 5
  out[#out + 1] = ''
  return out
elseif not o.state then
  code = 3
else
  expire_if_due(id, o)
  if op == 'pay' then
    if o.state == 'reserved' then
      o.state = 'paid'
      o.paid_at = now
      if ref ~= '' then o.payment_ref = ref end
      save(id, o)
      redis.call('ZREM', KEYS[7], id)
      local n = quantity(o)
      redis.call('HINCRBY', KEYS[1], 'reserved', -n)
      redis.call('HINCRBY', KEYS[1], 'paid', n)
      if n > 1 then
        redis.call('HINCRBY', KEYS[1], 'extra_paid', n - 1)
      end
      append('paid', id, o, ref ~= '' and ref or nil)
    elseif o.state ~= 'paid' then
      code = 2
    end
  elseif op == 'cancel' then
    if o.state == 'reserved' then
      release(id, o, 'cancelled')
    elseif o.state ~= 'cancelled' then
      code = 2
    end
  end
end
out = header()
out[#out + 1] = code
out[#out + 1] = cjson.encode(o)
return out
