--@@ prelude
-- KEYS[1] is the structure's base key `girder:ds:{NAMESPACE:NAME}`: every key of one
-- structure shares its hash tag. B..':k' holds its kind; B holds the data; B..':v' a
-- value's version; B..':s' a sequence (fencing tokens, topic ids); B..':h' semaphore holders.
-- ARGV[1] kind, ARGV[2] the namespace's change channel, ARGV[3] the structure's name.
local B, KIND, CHANNEL, NAME = KEYS[1], ARGV[1], ARGV[2], ARGV[3]

local function check(create)
  local k = redis.call('GET', B .. ':k')
  if k then
    if k ~= KIND then error({err = 'GIRDER_WRONG_KIND ' .. k}) end
    return true
  end
  if create then redis.call('SET', B .. ':k', KIND) end
  return false
end

local function changed() redis.call('PUBLISH', CHANNEL, NAME) end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Versions only grow, across deletes too: the clock in microseconds, or one more.
local function next_version()
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local old = tonumber(redis.call('GET', B .. ':v') or '0')
  if old >= now then return old + 1 end
  return now
end

local function expire_with(ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', B, ttl)
    redis.call('PEXPIRE', B .. ':v', ttl)
    redis.call('PEXPIRE', B .. ':k', ttl)
  else
    redis.call('PERSIST', B)
    redis.call('PERSIST', B .. ':v')
    redis.call('PERSIST', B .. ':k')
  end
end
--@@ value_get
if not check(false) then return false end
local v = redis.call('GET', B)
if not v then return false end
return {v, redis.call('GET', B .. ':v') or '0'}
--@@ value_set: ARGV[4] value, ARGV[5] ttl ms (0 none)
check(true)
local version = next_version()
redis.call('SET', B, ARGV[4])
redis.call('SET', B .. ':v', version)
expire_with(tonumber(ARGV[5]))
changed()
return string.format('%.0f', version)
--@@ value_cas: ARGV[4] expected version ('' = unset), ARGV[5] value
local exists = check(false) and redis.call('EXISTS', B) == 1
local current = '0'
if exists then current = redis.call('GET', B .. ':v') or '0' end
if ARGV[4] == '' then
  if exists then return false end
elseif not exists or current ~= ARGV[4] then
  return false
end
check(true)
local version = next_version()
redis.call('SET', B, ARGV[5], 'KEEPTTL')
redis.call('SET', B .. ':v', version, 'KEEPTTL')
changed()
return string.format('%.0f', version)
--@@ value_compare_and_set: ARGV[4] '1' if a value is expected ('0': only if unset), ARGV[5] expected bytes, ARGV[6] value
-- Compares the stored bytes, not the version: a rewrite of the same bytes still matches.
local exists = check(false) and redis.call('EXISTS', B) == 1
if ARGV[4] == '0' then
  if exists then return false end
elseif not exists or redis.call('GET', B) ~= ARGV[5] then
  return false
end
check(true)
local version = next_version()
redis.call('SET', B, ARGV[6], 'KEEPTTL')
redis.call('SET', B .. ':v', version, 'KEEPTTL')
changed()
return string.format('%.0f', version)
--@@ value_append: ARGV[4] chunk, ARGV[5] max bytes
check(true)
local total = redis.call('STRLEN', B) + string.len(ARGV[4])
if total > tonumber(ARGV[5]) then error({err = 'GIRDER_TOO_LARGE ' .. total}) end
local version = next_version()
redis.call('APPEND', B, ARGV[4])
redis.call('SET', B .. ':v', version, 'KEEPTTL')
changed()
return total
--@@ delete
if not check(false) then return 0 end
if KIND == 'multimap' then
  for _, field in ipairs(redis.call('HKEYS', B)) do redis.call('DEL', B .. ':f:' .. field) end
end
redis.call('DEL', B, B .. ':k', B .. ':h')
-- The version and sequence keys stay: versions and fencing tokens never go back.
if redis.call('EXISTS', B .. ':v') == 1 then redis.call('PERSIST', B .. ':v') end
changed()
return 1
--@@ exists
if not check(false) then return 0 end
if KIND == 'value' or KIND == 'atom' then return redis.call('EXISTS', B) end
return 1
--@@ counter_add: ARGV[4] delta
check(true)
redis.call('INCRBY', B, ARGV[4])
-- Read back as a string: Lua numbers are doubles and would round large counters.
return redis.call('GET', B)
--@@ counter_cas: ARGV[4] expected, ARGV[5] new
check(true)
if (redis.call('GET', B) or '0') ~= ARGV[4] then return 0 end
redis.call('SET', B, ARGV[5])
return 1
--@@ map_put: ARGV[4] field, ARGV[5] value
check(true)
if KIND == 'map' then
  local old = redis.call('HGET', B, ARGV[4])
  redis.call('HSET', B, ARGV[4], ARGV[5])
  return old
end
-- multimap: B is a hash field -> member count; each field's values are a set B..':f:'..field
local added = redis.call('SADD', B .. ':f:' .. ARGV[4], ARGV[5])
if added == 1 then redis.call('HINCRBY', B, ARGV[4], 1) end
if added == 1 then return '' end
return false
--@@ map_get: ARGV[4] field
if not check(false) then return {} end
if KIND == 'map' then
  local v = redis.call('HGET', B, ARGV[4])
  if v then return {v} end
  return {}
end
return redis.call('SMEMBERS', B .. ':f:' .. ARGV[4])
--@@ map_remove: ARGV[4] field, ARGV[5] value ('' with ARGV[6] = '0' for all)
if not check(false) then return 0 end
if KIND == 'map' then return redis.call('HDEL', B, ARGV[4]) end
local fkey = B .. ':f:' .. ARGV[4]
local removed
if ARGV[6] == '1' then
  removed = redis.call('SREM', fkey, ARGV[5])
else
  removed = redis.call('SCARD', fkey)
  redis.call('DEL', fkey)
end
local left = redis.call('SCARD', fkey)
if left == 0 then redis.call('HDEL', B, ARGV[4]) else redis.call('HSET', B, ARGV[4], left) end
return removed
--@@ map_len
if not check(false) then return 0 end
if KIND == 'map' then return redis.call('HLEN', B) end
local total = 0
for _, n in ipairs(redis.call('HVALS', B)) do total = total + tonumber(n) end
return total
--@@ map_entries: ARGV[4] limit
if not check(false) then return {} end
local limit = tonumber(ARGV[4])
local out = {}
if KIND == 'map' then
  local all = redis.call('HGETALL', B)
  for i = 1, math.min(#all, 2 * limit) do out[i] = all[i] end
  return out
end
for _, field in ipairs(redis.call('HKEYS', B)) do
  for _, v in ipairs(redis.call('SMEMBERS', B .. ':f:' .. field)) do
    if #out >= 2 * limit then return out end
    table.insert(out, field)
    table.insert(out, v)
  end
end
return out
--@@ set_op: ARGV[4] op (add|remove|contains|len|members), ARGV[5] member or limit
local op = ARGV[4]
if not check(op == 'add') and op ~= 'add' then
  if op == 'members' then return {} end
  return 0
end
if op == 'add' then return redis.call('SADD', B, ARGV[5]) end
if op == 'remove' then return redis.call('SREM', B, ARGV[5]) end
if op == 'contains' then return redis.call('SISMEMBER', B, ARGV[5]) end
if op == 'len' then return redis.call('SCARD', B) end
local out = {}
for _, m in ipairs(redis.call('SMEMBERS', B)) do
  if #out >= tonumber(ARGV[5]) then break end
  table.insert(out, m)
end
return out
--@@ list_push: ARGV[4] value, ARGV[5] front ('1'/'0'), ARGV[6] capacity ('' none)
check(true)
if ARGV[6] ~= '' and redis.call('LLEN', B) >= tonumber(ARGV[6]) then return false end
local len
if ARGV[5] == '1' then len = redis.call('LPUSH', B, ARGV[4]) else len = redis.call('RPUSH', B, ARGV[4]) end
return len
--@@ list_pop: ARGV[4] front ('1'/'0')
if not check(false) then return false end
if ARGV[4] == '1' then return redis.call('LPOP', B) end
return redis.call('RPOP', B)
--@@ list_get: ARGV[4] index
if not check(false) then return false end
return redis.call('LINDEX', B, ARGV[4])
--@@ list_set: ARGV[4] index, ARGV[5] value
if not check(false) then return 0 end
local len = redis.call('LLEN', B)
local i = tonumber(ARGV[4])
if i < 0 then i = len + i end
if i < 0 or i >= len then return 0 end
redis.call('LSET', B, i, ARGV[5])
return 1
--@@ list_range: ARGV[4] start, ARGV[5] stop, ARGV[6] limit
if not check(false) then return {} end
local out = redis.call('LRANGE', B, ARGV[4], ARGV[5])
local limit = tonumber(ARGV[6])
while #out > limit do table.remove(out) end
return out
--@@ list_len
if not check(false) then return 0 end
return redis.call('LLEN', B)
--@@ lock_acquire: ARGV[4] holder, ARGV[5] lease ms
check(true)
if redis.call('EXISTS', B) == 1 then return false end
local token = redis.call('INCR', B .. ':s')
redis.call('SET', B, ARGV[4] .. ' ' .. token, 'PX', ARGV[5])
return token
--@@ lock_renew: ARGV[4] holder, ARGV[5] token, ARGV[6] lease ms
if not check(false) then return 0 end
if redis.call('GET', B) ~= ARGV[4] .. ' ' .. ARGV[5] then return 0 end
redis.call('PEXPIRE', B, ARGV[6])
return 1
--@@ lock_release: ARGV[4] holder, ARGV[5] token
if not check(false) then return 0 end
if redis.call('GET', B) ~= ARGV[4] .. ' ' .. ARGV[5] then return 0 end
redis.call('DEL', B)
changed()
return 1
--@@ lock_holder
if not check(false) then return false end
return redis.call('GET', B)
--@@ latch_try_set: ARGV[4] count
check(true)
if tonumber(redis.call('GET', B) or '0') > 0 then return 0 end
redis.call('SET', B, ARGV[4])
changed()
return 1
--@@ latch_count_down
if not check(false) then return 0 end
local left = tonumber(redis.call('GET', B) or '0')
if left > 0 then
  left = redis.call('DECR', B)
  changed()
end
return left
--@@ latch_count
if not check(false) then return 0 end
return tonumber(redis.call('GET', B) or '0')
--@@ semaphore_init: ARGV[4] permits
local existed = check(true) and redis.call('EXISTS', B) == 1
redis.call('SET', B, ARGV[4])
changed()
if existed then return 0 end
return 1
--@@ semaphore_acquire: ARGV[4] holder, ARGV[5] lease ms
if not check(false) or redis.call('EXISTS', B) == 0 then error({err = 'GIRDER_INVALID semaphore ' .. NAME .. ' is not initialized'}) end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', B .. ':h', '-inf', now)
if not redis.call('ZSCORE', B .. ':h', ARGV[4]) and redis.call('ZCARD', B .. ':h') >= tonumber(redis.call('GET', B)) then
  return 0
end
redis.call('ZADD', B .. ':h', now + tonumber(ARGV[5]), ARGV[4])
return 1
--@@ semaphore_renew: ARGV[4] holder, ARGV[5] lease ms
if not check(false) then return 0 end
local now = now_ms()
local until_ms = redis.call('ZSCORE', B .. ':h', ARGV[4])
if not until_ms or tonumber(until_ms) <= now then return 0 end
redis.call('ZADD', B .. ':h', now + tonumber(ARGV[5]), ARGV[4])
return 1
--@@ semaphore_release: ARGV[4] holder
if not check(false) then return 0 end
local removed = redis.call('ZREM', B .. ':h', ARGV[4])
if removed == 1 then changed() end
return removed
--@@ semaphore_available
if not check(false) then return 0 end
local held = redis.call('ZCOUNT', B .. ':h', '(' .. now_ms(), '+inf')
return math.max(0, tonumber(redis.call('GET', B) or '0') - held)
--@@ reliable_publish: ARGV[4] message, ARGV[5] count max, ARGV[6] age ms max (0 none)
check(true)
local seq = redis.call('INCR', B .. ':s')
local now = now_ms()
redis.call('XADD', B, 'MAXLEN', ARGV[5], seq .. '-0', 'm', ARGV[4], 't', now)
local age = tonumber(ARGV[6])
if age > 0 then
  -- Drop what is too old, a bounded number per publish.
  for _, entry in ipairs(redis.call('XRANGE', B, '-', '+', 'COUNT', 100)) do
    local fields = entry[2]
    local t = 0
    for i = 1, #fields, 2 do if fields[i] == 't' then t = tonumber(fields[i + 1]) end end
    if t >= now - age then break end
    redis.call('XDEL', B, entry[1])
  end
end
changed()
return seq
--@@ reliable_read: ARGV[4] after, ARGV[5] max
if not check(false) then return {'0'} end
local out = {}
local first = redis.call('XRANGE', B, '-', '+', 'COUNT', 1)
if #first == 0 then return {'0', '0'} end
table.insert(out, string.match(first[1][1], '^(%d+)'))
table.insert(out, string.match(redis.call('XREVRANGE', B, '+', '-', 'COUNT', 1)[1][1], '^(%d+)'))
for _, entry in ipairs(redis.call('XRANGE', B, '(' .. ARGV[4] .. '-0', '+', 'COUNT', ARGV[5])) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'm' then
      table.insert(out, string.match(entry[1], '^(%d+)'))
      table.insert(out, fields[i + 1])
    end
  end
end
return out
