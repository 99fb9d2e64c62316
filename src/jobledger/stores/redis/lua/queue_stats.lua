-- {now, then per queue: name, then per state in ARGV[2..]: count, oldest score or ""}.
-- ZCARD and the first member of each (state, queue) index: no job is read.
local result = {fmt(now())}
for _, queue in ipairs(redis.call('SMEMBERS', k('queues'))) do
  result[#result + 1] = queue
  for i = 2, #ARGV do
    local index = k('qs', ARGV[i], queue)
    result[#result + 1] = redis.call('ZCARD', index)
    local first = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
    result[#result + 1] = first[2] or ''
  end
end
return result
