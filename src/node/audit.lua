-- One page of `stock audit`'s pass over the buyers, added up inside Redis:
-- only the sums cross the network, and each call is bounded (a page), so a
-- sale of a million buyers never holds Redis's single thread for long.
-- KEYS as in deduct.lua.
--
-- ARGV[1] = 'buyers': one HSCAN page of the buyers hash from cursor ARGV[2]
-- (COUNT ARGV[3]). Returns {next cursor ('0': done), fields read, tickets
-- they hold added up, the most any one of them holds}. HSCAN may return a
-- field twice while Redis resizes the hash: the caller compares the fields
-- read with HLEN, and a pass that read more is not conclusive.
if ARGV[1] == 'buyers' then
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
