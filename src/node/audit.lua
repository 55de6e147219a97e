-- One page of `stock audit`'s passes, counted inside Redis: only the
-- counts cross the network, and each call is bounded (a page), so a sale of
-- a million orders never holds Redis's single thread for long. KEYS as in
-- deduct.lua.
--
-- ARGV[1] = 'events': the stream's entries from ARGV[2] (an XRANGE start:
-- '(ID' exclusive) to ARGV[3] (the last id to count, inclusive), at most
-- ARGV[4] of them. Returns {the last id read ('' when none), entries read,
-- creations ('sold' or 'reserved'), payments, releases ('cancelled' or
-- 'expired'), the operator's changes ('paused', 'resumed', 'closed',
-- 'added')}.
--
-- ARGV[1] = 'buyers': one HSCAN page of the buyers hash from cursor ARGV[2]
-- (COUNT ARGV[3]). Returns {next cursor ('0': done), fields read, tickets
-- they hold added up, the most any one of them holds}. HSCAN may return a
-- field twice while Redis resizes the hash: the caller compares the fields
-- read with HLEN, and a pass that read more is not conclusive.
if ARGV[1] == 'events' then
  local entries = redis.call('XRANGE', KEYS[8], ARGV[2], ARGV[3], 'COUNT', tonumber(ARGV[4]))
  local created, paid, released, controls = 0, 0, 0, 0
  local last = ''
  for _, e in ipairs(entries) do
    last = e[1]
    local f = e[2]
    local kind
    for i = 1, #f, 2 do
      if f[i] == 'type' then kind = f[i + 1]; break end
    end
    if kind == 'sold' or kind == 'reserved' then
      created = created + 1
    elseif kind == 'paid' then
      paid = paid + 1
    elseif kind == 'cancelled' or kind == 'expired' then
      released = released + 1
    elseif kind == 'paused' or kind == 'resumed' or kind == 'closed' or kind == 'added' then
      controls = controls + 1
    end
  end
  return {last, #entries, created, paid, released, controls}
elseif ARGV[1] == 'buyers' then
  local page = redis.call('HSCAN', KEYS[2], ARGV[2], 'COUNT', tonumber(ARGV[3]))
  local pairs_ = page[2]
  local sum, most = 0, 0
  for i = 2, #pairs_, 2 do
    local n = tonumber(pairs_[i])
    if not n or n < 0 then
      return redis.error_reply('a buyer holds ' .. pairs_[i] .. ' tickets')
    end
    sum = sum + n
    if n > most then most = n end
  end
  return {page[1], #pairs_ / 2, sum, most}
end
return redis.error_reply('audit.lua: unknown ' .. tostring(ARGV[1]))
