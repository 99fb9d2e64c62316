-- End a lease on jobs still staged and held by the token (ARGV[2]): free again, their last
-- move back to when they were staged. ARGV[3..]: the ids. How many were freed.
local token, freed = ARGV[2], 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local key = k('job', id)
  local v = redis.call('HMGET', key, 'state', 'owner', 'staged_at', 'updated_at')
  if v[1] == 'staged' and v[2] == token then
    local back = v[3] or v[4]
    redis.call('HDEL', key, 'owner')
    redis.call('HSET', key, 'updated_at', back)
    redis.call('ZADD', k('state', 'staged'), back, id)
    freed = freed + 1
  end
end
return freed
