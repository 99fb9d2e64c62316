-- Insert a job if its id is free. KEYS[1]: the job. ARGV[2]: id; ARGV[3]: ",field,..." of the
-- times to stamp with the server's clock; ARGV[4..]: field, value pairs. 1 if created; a
-- one-element list {holder id} if another job holds its unique key (``unique_hold``): nothing
-- written then. ``P:unique:<key>`` names the holder until the job ends (``release_hold``).
local key, id = KEYS[1], ARGV[2]
if redis.call('EXISTS', key) == 1 then
  return 0
end
local f = {}
local values = {}
for i = 4, #ARGV, 2 do
  f[ARGV[i]] = ARGV[i + 1]
end
if f.unique_hold then
  local holder = redis.call('GET', k('unique', f.unique_hold))
  if holder then
    return {holder}
  end
  redis.call('SET', k('unique', f.unique_hold), id)
end
local at = fmt(now())
for name in string.gmatch(ARGV[3], '[^,]+') do
  f[name] = at
end
for name, value in pairs(f) do
  values[#values + 1] = name
  values[#values + 1] = value
end
redis.call('HSET', key, unpack(values))
redis.call('ZADD', k('order'), 0, member(id, f))
redis.call('SADD', k('queues'), f.queue)
index_state(id, f)
return 1
