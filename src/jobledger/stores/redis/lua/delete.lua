-- Delete a job if it matches the compare. KEYS[1]: the job; ARGV[2]: id; ARGV[3..5]: the
-- compare (see ``expected``). 1 if deleted.
local key, id = KEYS[1], ARGV[2]
local f = load_meta(key)
if not f or not expected(f, ARGV[3], ARGV[4], ARGV[5]) then
  return 0
end
release_hold(key, id)
unindex_state(id, f)
redis.call('ZREM', k('order'), member(id, f))
redis.call('DEL', key)
return 1
