-- One bounded step of a walk down a lexicographic ``order`` index, newest first, testing each
-- job on the server so only the matches travel. KEYS[1]: the index; ARGV[2]: where to start
-- ("+" or "(" .. member); ARGV[3]: how many members to examine at most; ARGV[4]: the filter,
-- JSON {queues, names, systems, owners, unique_keys: [..], older, newer: seconds, recovered: bool,
-- has: [fields]};
-- ARGV[5..]: literal needles, any of which in args, kwargs or tags matches.
-- Returns {last member examined, or "" when the index ended; the matching members...}.
local limit = tonumber(ARGV[3])
local found = redis.call('ZRANGE', KEYS[1], ARGV[2], '-', 'BYLEX', 'REV', 'LIMIT', 0, limit)
local filter = cjson.decode(ARGV[4])
local t = now()

local function set_of(list)
  if not list then
    return nil
  end
  local s = {}
  for _, v in ipairs(list) do
    s[v] = true
  end
  return s
end

local wanted = {queue = set_of(filter.queues), name = set_of(filter.names),
  system = set_of(filter.systems), owner = set_of(filter.owners),
  unique_key = set_of(filter.unique_keys)}
local tested = {'queue', 'name', 'system', 'owner', 'unique_key'}
local oldest = filter.older and (t - filter.older) or nil
local newest = filter.newer and (t - filter.newer) or nil
local fields = {'queue', 'name', 'system', 'owner', 'unique_key', 'updated_at', 'recoveries'}
for _, name in ipairs(filter.has or {}) do
  fields[#fields + 1] = name
end
local needles = {}
for i = 5, #ARGV do
  needles[#needles + 1] = ARGV[i]
end

local function passes(id)
  local key = k('job', id)
  local v = redis.call('HMGET', key, unpack(fields))
  for i, name in ipairs(tested) do
    if wanted[name] and not (v[i] and wanted[name][v[i]]) then
      return false
    end
  end
  local updated = tonumber(v[6])
  if oldest and not (updated <= oldest) then
    return false
  end
  if newest and not (updated > newest) then
    return false
  end
  if filter.recovered and not (tonumber(v[7] or '0') > 0) then
    return false
  end
  for i = 8, #fields do
    if not v[i] then
      return false
    end
  end
  if #needles == 0 then
    return true
  end
  local texts = redis.call('HMGET', key, 'args', 'kwargs', 'tags')
  for _, text in ipairs(texts) do
    for _, needle in ipairs(needles) do
      if string.find(text, needle, 1, true) then
        return true
      end
    end
  end
  return false
end

local result = {''}
for _, m in ipairs(found) do
  if passes(string.sub(m, 17)) then
    result[#result + 1] = m
  end
end
if #found == limit then
  result[1] = found[#found]
end
return result
