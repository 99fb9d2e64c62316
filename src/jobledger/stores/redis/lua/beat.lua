-- Register an instance or refresh its heartbeat. KEYS[1]: the instance; ARGV[2]: its id;
-- ARGV[3]: milliseconds the key outlives its last beat; ARGV[4..7]: name, nonce, hostname,
-- pid (kept from the first beat); ARGV[8..]: field, value pairs of this beat.
local key, id = KEYS[1], ARGV[2]
local at = fmt(now())
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'id', id, 'name', ARGV[4], 'nonce', ARGV[5], 'hostname', ARGV[6],
    'pid', ARGV[7], 'started_at', at)
end
local values = {'heartbeat_at', at}
for i = 8, #ARGV do
  values[#values + 1] = ARGV[i]
end
redis.call('HSET', key, unpack(values))
redis.call('PEXPIRE', key, ARGV[3])
redis.call('ZADD', k('beats'), at, id)
return 1
