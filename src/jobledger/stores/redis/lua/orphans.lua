-- Started jobs whose owner is gone or silent past ARGV[2] seconds, oldest start first, at
-- most ARGV[3]: each as a flat field, value list. Reads the per-owner index of started jobs,
-- so its cost follows the number of owners and orphans, not of jobs.
local since, limit = now() - tonumber(ARGV[2]), tonumber(ARGV[3])
local found = {}
for _, owner in ipairs(redis.call('SMEMBERS', k('owners'))) do
  local at = redis.call('HGET', k('instance', owner), 'heartbeat_at')
  if not (at and tonumber(at) >= since) then
    local held = redis.call('ZRANGE', k('owner', owner), 0, limit - 1, 'WITHSCORES')
    for i = 1, #held, 2 do
      found[#found + 1] = {tonumber(held[i + 1]), held[i]}
    end
  end
end
table.sort(found, function(a, b)
  if a[1] ~= b[1] then
    return a[1] < b[1]
  end
  return a[2] < b[2]
end)
local rows = {}
for i = 1, math.min(limit, #found) do
  rows[i] = redis.call('HGETALL', k('job', found[i][2]))
end
return rows
