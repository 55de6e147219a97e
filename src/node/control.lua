-- Changes a running sale: `spike stock pause`, `resume`, `close` and `add
-- N` (the railway's staged release: more tickets into a running sale, with
-- no reset). Every node learns of it at its next store call (each purchase
-- and lease request reads the sale's state) and its next once-a-second
-- poll. Each change is an event in the sale's stream, and counted in
-- `controls` (so `stock audit` can account for every event).
-- KEYS as in deduct.lua. ARGV[1] 'pause', 'resume', 'close' or 'add';
-- ARGV[2] the tickets to add.
-- Returns {1, total, paused (0/1), closes_at (Unix ms, 0: none)}, or
-- {0, why} when the change makes no sense, or {4} when there is no sale.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local s = redis.call('HMGET', KEYS[1], 'total', 'closes_at', 'paused', 'stream_max', 'closed')
if not s[1] then
  return {4}
end
local total = tonumber(s[1])
local closes_at = tonumber(s[2] or '0')
local paused = s[3] == '1'
if s[5] == '1' or (closes_at > 0 and now >= closes_at) then
  return {0, 'the sale is closed: nothing changes it any more (`spike stock init --force` starts another)'}
end
local op = ARGV[1]
local event = {'type', '', 'at', string.format('%d', now)}
if op == 'pause' then
  if paused then return {0, 'the sale is paused already'} end
  redis.call('HSET', KEYS[1], 'paused', 1)
  paused, event[2] = true, 'paused'
elseif op == 'resume' then
  if not paused then return {0, 'the sale is not paused'} end
  redis.call('HDEL', KEYS[1], 'paused')
  paused, event[2] = false, 'resumed'
elseif op == 'close' then
  -- `closed` as well as the moment: no clock that steps back (a failover
  -- to a replica whose clock is behind) opens a closed sale again.
  redis.call('HSET', KEYS[1], 'closes_at', now, 'closed', 1)
  closes_at, event[2] = now, 'closed'
elseif op == 'add' then
  local n = tonumber(ARGV[2])
  if not n or n < 1 or n ~= math.floor(n) then
    return {0, 'add takes a whole number of tickets, 1 or more'}
  end
  total = redis.call('HINCRBY', KEYS[1], 'total', n)
  event[2] = 'added'
  event[#event + 1] = 'tickets'
  event[#event + 1] = string.format('%d', n)
  event[#event + 1] = 'total'
  event[#event + 1] = string.format('%d', total)
else
  return {0, 'unknown change ' .. tostring(op)}
end
redis.call('HINCRBY', KEYS[1], 'controls', 1)
redis.call('XADD', KEYS[8], 'MAXLEN', '~', s[4] or '100000', '*', unpack(event))
return {1, total, paused and 1 or 0, closes_at}
