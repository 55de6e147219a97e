-- The sale's state in constant time, for `stock show`, a node's `/sale` and
-- the start of `stock audit`: counters the scripts keep, and hash and set
-- lengths, never a pass over the buyers. KEYS as in deduct.lua.
-- Returns {exists, total, sold, orders, buyers, tickets held by named buyers,
-- the most any one buyer holds, epoch, limit, units leased, keys recorded,
-- order ids handed out (seq), payment window ms, reserved, paid, released,
-- deadline entries, events in the stream now, the stream's bound (0: a sale
-- written before the stream existed), 1 when final sales are streamed,
-- when it opens and closes (Unix ms, 0: no such moment), 1 when paused,
-- the operator's changes so far (pause, resume, close, add), 1 when closed
-- by the operator, and the tickets beyond the first of each order created,
-- of each paid, of each released (`extra`, `extra_paid`, `extra_released`:
-- orders of several tickets)}.
--
-- With ARGV[1] = 'audit', four more, read in the same step so that the
-- counters and the stream agree: the id of the stream's last entry ('0-0'
-- when it has none), how many entries were ever added to it (XINFO's
-- `entries-added`, Redis 7; -1 when it does not say or there is no
-- stream), and where this sale's events begin (`events_from`, '' for a
-- sale written before the stream outlived resets) with the count added by
-- then (`events_base`, -1 when unknown). `stock audit` counts the stream up
-- to that last id: on a moving sale it stays conclusive.
local s = redis.call('HMGET', KEYS[1], 'total', 'sold', 'held', 'most', 'epoch', 'limit',
  'seq', 'pay_within', 'reserved', 'paid', 'released', 'stream_max', 'stream', 'opens_at',
  'closes_at', 'paused', 'controls', 'closed', 'extra', 'extra_paid', 'extra_released')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local leased = 0
local raw = redis.call('HGETALL', KEYS[5])
for i = 2, #raw, 2 do
  local units, expires = string.match(raw[i], '^(%d+):(%d+)$')
  if units and tonumber(expires) > now then leased = leased + tonumber(units) end
end
local snap = {s[1] and 1 or 0, tonumber(s[1] or '0'), tonumber(s[2] or '0'),
  redis.call('HLEN', KEYS[3]), redis.call('HLEN', KEYS[2]), tonumber(s[3] or '0'),
  tonumber(s[4] or '0'), s[5] or '', tonumber(s[6] or '0'), leased, redis.call('HLEN', KEYS[6]),
  math.max(tonumber(s[7] or '0'), tonumber(s[2] or '0')), tonumber(s[8] or '0'), tonumber(s[9] or '0'),
  tonumber(s[10] or '0'), tonumber(s[11] or '0'), redis.call('ZCARD', KEYS[7]),
  redis.call('XLEN', KEYS[8]), tonumber(s[12] or '0'), tonumber(s[13] or '0'),
  tonumber(s[14] or '0'), tonumber(s[15] or '0'), tonumber(s[16] or '0'), tonumber(s[17] or '0'),
  tonumber(s[18] or '0'), tonumber(s[19] or '0'), tonumber(s[20] or '0'),
  tonumber(s[21] or '0')}
if ARGV[1] == 'audit' then
  local last = redis.call('XREVRANGE', KEYS[8], '+', '-', 'COUNT', 1)[1]
  snap[#snap + 1] = last and last[1] or '0-0'
  local added = -1
  local ok, info = pcall(redis.call, 'XINFO', 'STREAM', KEYS[8])
  if ok then
    for i = 1, #info, 2 do
      if info[i] == 'entries-added' then added = tonumber(info[i + 1]) end
    end
  end
  snap[#snap + 1] = added
  local from = redis.call('HMGET', KEYS[1], 'events_from', 'events_base')
  snap[#snap + 1] = from[1] or ''
  snap[#snap + 1] = tonumber(from[2] or '-1') or -1
end
return snap
