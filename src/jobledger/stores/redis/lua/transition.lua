-- One compare-and-set move of a job. KEYS[1]: the job. ARGV[2]: id; ARGV[3..5]: the compare
-- (see ``expected``); ARGV[6]: the moment ("" = the server's clock); ARGV[7..]: field, op,
-- value triples, op: s (set), d (clear), n (the moment), i (plus one), e (the moment if empty),
-- g (a guard: the field still holds the value, "" for none, or nothing is written).
-- 1 if this call won; 2 if the compare matched but a guard did not (the caller reads again).
local key, id = KEYS[1], ARGV[2]
local f = load_meta(key)
if not f or not expected(f, ARGV[3], ARGV[4], ARGV[5]) then
  return 0
end
for i = 7, #ARGV, 3 do
  if ARGV[i + 1] == 'g' and (redis.call('HGET', key, ARGV[i]) or '') ~= ARGV[i + 2] then
    return 2
  end
end
local at = ARGV[6]
if at == '' then
  at = fmt(now())
end
unindex_state(id, f)
local sets, clears = {}, {}
for i = 7, #ARGV, 3 do
  local name, op, value = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'g' then
    name = nil -- a guard, checked above
  elseif op == 's' then
    f[name] = value
  elseif op == 'd' then
    if name == 'unique_hold' then
      release_hold(key, id) -- the move that ends the job frees its key
    end
    f[name] = nil
  elseif op == 'n' then
    f[name] = at
  elseif op == 'i' then
    f[name] = tostring(tonumber(f[name] or '0') + 1)
  elseif op == 'e' then
    f[name] = f[name] or at
  end
  if name == nil then
    -- nothing to write
  elseif f[name] == nil then
    clears[#clears + 1] = name
  else
    sets[#sets + 1] = name
    sets[#sets + 1] = f[name]
  end
end
if #sets > 0 then
  redis.call('HSET', key, unpack(sets))
end
if #clears > 0 then
  redis.call('HDEL', key, unpack(clears))
end
index_state(id, f)
return 1
