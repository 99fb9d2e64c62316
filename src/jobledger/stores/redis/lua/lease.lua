-- Lease staged jobs to a relay batch. ARGV[2]: the lease token; ARGV[3]: how many at most;
-- ARGV[4]: only jobs staged at least this many seconds ago; ARGV[5]: seconds a lease lasts;
-- ARGV[6]: JSON list of systems, or "" for any; ARGV[7..]: the ids to lease (none: the
-- oldest staged first). Returns each leased job as it was before, a flat field, value list.
local token, limit = ARGV[2], tonumber(ARGV[3])
local older, lease = tonumber(ARGV[4]), tonumber(ARGV[5])
local systems = nil
if ARGV[6] ~= '' then
  systems = {}
  for _, s in ipairs(cjson.decode(ARGV[6])) do
    systems[s] = true
  end
end
local t = now()
local by_age = k('state', 'staged')

local function free(id, updated)
  local v = redis.call('HMGET', k('job', id), 'state', 'owner', 'system')
  if v[1] ~= 'staged' then
    return false
  end
  if v[2] and not (updated <= t - lease) then
    return false
  end
  if older > 0 and not (updated <= t - older) then
    return false
  end
  return systems == nil or systems[v[3]] == true
end

local chosen = {}
if #ARGV >= 7 then
  for i = 7, #ARGV do
    if #chosen >= limit then
      break
    end
    local updated = redis.call('ZSCORE', by_age, ARGV[i])
    if updated and free(ARGV[i], tonumber(updated)) then
      chosen[#chosen + 1] = ARGV[i]
    end
  end
else
  local upto = older > 0 and fmt(t - older) or '+inf'
  local offset = 0
  while #chosen < limit do
    local chunk = redis.call('ZRANGEBYSCORE', by_age, '-inf', upto, 'WITHSCORES', 'LIMIT', offset, 500)
    if #chunk == 0 then
      break
    end
    for i = 1, #chunk, 2 do
      if free(chunk[i], tonumber(chunk[i + 1])) then
        chosen[#chosen + 1] = chunk[i]
        if #chosen >= limit then
          break
        end
      end
    end
    offset = offset + 500
  end
end
local stamp = fmt(t)
local rows = {}
for _, id in ipairs(chosen) do
  local key = k('job', id)
  rows[#rows + 1] = redis.call('HGETALL', key)  -- as it was before the lease
  redis.call('HSET', key, 'owner', token, 'updated_at', stamp)
  redis.call('ZADD', by_age, stamp, id)
end
return rows
