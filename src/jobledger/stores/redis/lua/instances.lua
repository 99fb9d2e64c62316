-- Every registered instance: {now, {field, value, ...} per instance}. Instances whose key
-- expired (silent for the whole expiry) leave the beats index here.
local result = {fmt(now())}
for _, id in ipairs(redis.call('ZRANGE', k('beats'), 0, -1)) do
  local row = redis.call('HGETALL', k('instance', id))
  if #row == 0 then
    redis.call('ZREM', k('beats'), id)
  else
    result[#result + 1] = row
  end
end
return result
