-- 1 if the instance ARGV[2] is registered and beat within ARGV[3] seconds.
local at = redis.call('HGET', k('instance', ARGV[2]), 'heartbeat_at')
if at and tonumber(at) >= now() - tonumber(ARGV[3]) then
  return 1
end
return 0
