-- What changed among a sale's holders since a node last read them, in one
-- step with the sale's state: the events of the sale's stream after a
-- cursor (every reservation, sale, payment, cancel and expiry is one). A
-- node keeps its holders current with it instead of reading every holder
-- again on each returned ticket. Reads only, and per event only what the
-- event carries: with a limit of 1 the last creation or release of a
-- buyer says whether they hold the limit; with a higher limit each buyer
-- named is looked up (their count and last order now).
--
-- KEYS as in deduct.lua.
-- ARGV[1] the cursor: the last event taken in ('0-0': none; the stream
--   was empty or absent when the holders were first read).
-- ARGV[2] most events to read.  ARGV[3] the per-user limit the node keeps.
-- Returns the header (as deduct.lua's: {0, epoch, limit, sold, total,
-- released, pay_within, opens_at, closes_at, paused, closed}) then
--   {1} when events after the cursor may have been trimmed (read the
--   holders in full), else
--   {0, last event read, 1 when more events wait else 0, buyers named,
--    buyer, the order that puts them at the limit or '' ... (2 per buyer),
--    then the keys of the orders created}.
-- {4} when there is no sale.
local s = redis.call('HMGET', KEYS[1], 'total', 'sold', 'epoch', 'limit', 'released',
  'pay_within', 'stream_max', 'opens_at', 'closes_at', 'paused', 'closed')
if not s[1] then
  return {4}
end
local out = {0, s[3] or '0', tonumber(s[4] or '0'), tonumber(s[2] or '0'), tonumber(s[1]),
  tonumber(s[5] or '0'), tonumber(s[6] or '0'), tonumber(s[8] or '0'), tonumber(s[9] or '0'),
  s[10] == '1' and 1 or 0, s[11] == '1' and 1 or 0}

local cursor, most = ARGV[1], tonumber(ARGV[2])
local trimmed
if cursor == '0-0' then
  -- The stream was empty: nothing was trimmed while it stays short of its
  -- bound (MAXLEN ~ keeps at least the bound).
  trimmed = redis.call('XLEN', KEYS[8]) >= tonumber(s[7] or '100000')
else
  trimmed = #redis.call('XRANGE', KEYS[8], cursor, cursor) == 0
end
if trimmed then
  out[#out + 1] = 1
  return out
end

local events = redis.call('XRANGE', KEYS[8], '(' .. cursor, '+', 'COUNT', most)
local limit = tonumber(ARGV[3])
local last = cursor
local holds, named, keys = {}, {}, {}
for _, e in ipairs(events) do
  last = e[1]
  local f = e[2]
  local kind, buyer, order, key
  for i = 1, #f, 2 do
    local name = f[i]
    if name == 'type' then kind = f[i + 1]
    elseif name == 'buyer' then buyer = f[i + 1]
    elseif name == 'order' then order = f[i + 1]
    elseif name == 'key' then key = f[i + 1]
    end
  end
  local created = kind == 'reserved' or kind == 'sold'
  if created or kind == 'expired' or kind == 'cancelled' then
    if created then
      if not key and order then
        -- An event written before events carried the key.
        local raw = redis.call('HGET', KEYS[3], order)
        key = raw and cjson.decode(raw).key
      end
      if key and key ~= '' then keys[#keys + 1] = key end
    end
    if buyer and buyer ~= '' then
      if holds[buyer] == nil then named[#named + 1] = buyer end
      holds[buyer] = created and order or ''
    end
  end
end
out[#out + 1] = 0
out[#out + 1] = last
out[#out + 1] = #events == most and 1 or 0
out[#out + 1] = #named
for _, b in ipairs(named) do
  out[#out + 1] = b
  if limit == 1 then
    out[#out + 1] = holds[b]
  elseif limit > 1 and tonumber(redis.call('HGET', KEYS[2], b) or '0') >= limit then
    out[#out + 1] = redis.call('HGET', KEYS[4], b) or ''
  else
    out[#out + 1] = ''
  end
end
for _, k in ipairs(keys) do
  out[#out + 1] = k
end
return out
