-- Free the lock KEYS[1] if token ARGV[2] holds it. 1 if freed.
if redis.call('GET', KEYS[1]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
