-- Take the lock KEYS[1] for token ARGV[2] for ARGV[3] milliseconds (SET NX PX), or renew it
-- if the token holds it. 1 if the token holds it now.
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return 1
end
if redis.call('GET', KEYS[1]) == ARGV[2] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
