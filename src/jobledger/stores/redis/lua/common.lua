-- Shared by every jobledger script (the loader puts it in front of each one).
-- ARGV[1] is always the key prefix, a hash tag such as "{jobledger}": every key of one ledger
-- is in one hash slot, so every script is single-slot (Redis Cluster-safe).
local P = ARGV[1]

local function k(...)
  return P .. ':' .. table.concat({...}, ':')
end

-- The server's clock: what every stamp and every age is judged on.
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- A number as text that reads back as the same double.
local function fmt(x)
  return string.format('%.17g', x)
end

-- 16 hex digits whose byte order is the numeric order of the double ``t``: the head of every
-- member of the lexicographic ``order`` indexes (head .. id sorts as (created_at, id)).
local function order_head(t)
  local b = struct.pack('>d', t)
  local neg = string.byte(b, 1) >= 128
  local out = {}
  for i = 1, 8 do
    local c = string.byte(b, i)
    if neg then
      c = 255 - c
    elseif i == 1 then
      c = c + 128
    end
    out[i] = string.format('%02x', c)
  end
  return table.concat(out)
end

-- The fields of a job that its indexes and compare-and-set read (never the arguments).
local META = {'state', 'owner', 'generation', 'queue', 'created_at', 'updated_at', 'staged_at',
  'queued_at', 'started_at', 'first_queued_at', 'attempts', 'recoveries', 'restarts'}

local function load_meta(key)
  local values = redis.call('HMGET', key, unpack(META))
  if not values[1] then
    return nil
  end
  local f = {}
  for i, name in ipairs(META) do
    if values[i] then
      f[name] = values[i]
    end
  end
  return f
end

-- The score of a job in its queue's per-state index: the time it entered a pending state
-- (what the queue's lag is measured from), its last move for the others.
local PHASE = {staged = 'staged_at', queued = 'queued_at', started = 'started_at'}

local function member(id, f)
  return order_head(tonumber(f.created_at)) .. id
end

-- Add the job to the indexes of its state (``order`` itself is kept by create and delete).
local function index_state(id, f)
  local state = f.state
  redis.call('ZADD', k('order', state), 0, member(id, f))
  redis.call('ZADD', k('state', state), f.updated_at, id)
  redis.call('ZADD', k('qs', state, f.queue), f[PHASE[state]] or f.updated_at, id)
  if state == 'started' and f.owner then
    redis.call('ZADD', k('owner', f.owner), f.started_at or f.updated_at, id)
    redis.call('SADD', k('owners'), f.owner)
  end
end

local function unindex_state(id, f)
  local state = f.state
  redis.call('ZREM', k('order', state), member(id, f))
  redis.call('ZREM', k('state', state), id)
  redis.call('ZREM', k('qs', state, f.queue), id)
  if state == 'started' and f.owner then
    local held = k('owner', f.owner)
    redis.call('ZREM', held, id)
    if redis.call('ZCARD', held) == 0 then
      redis.call('SREM', k('owners'), f.owner)
    end
  end
end

-- The compare of compare-and-set. ``states`` is ",a,b,"; ``owner`` is "*" (any), "" (none) or
-- "=" .. the owner; ``generation`` is "" (any) or the generation.
local function expected(f, states, owner, generation)
  if not string.find(states, ',' .. f.state .. ',', 1, true) then
    return false
  end
  if generation ~= '' and (f.generation or '0') ~= generation then
    return false
  end
  if owner == '*' then
    return true
  end
  if owner == '' then
    return f.owner == nil
  end
  return f.owner == string.sub(owner, 2)
end

-- Free the unique key the job at ``key`` holds, if any (its ``unique_hold``): called by the
-- move that ends the job and by its deletion, in the same script, so no key outlives its job.
local function release_hold(key, id)
  local held = redis.call('HGET', key, 'unique_hold')
  if held and redis.call('GET', k('unique', held)) == id then
    redis.call('DEL', k('unique', held))
  end
end
