--@@ register: ARGV = node, ttl_ms, then per function: name, version, unknown-function outcome
-- Replies REMOVE when an expired node of this id, or its unfinished removal, is in the way:
-- the caller removes it (`deregister` with only_expired, then `reclaim` until done) and
-- registers again, so that its old work is given back before the new node exists.
local node, ttl = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local exp = redis.call('HGET', P .. 'nodes', node)
if exp and tonumber(exp) > now then return 'DUPLICATE' end
if exp or redis.call('HEXISTS', P .. 'reclaiming', node) == 1 then return 'REMOVE' end
redis.call('SETNX', P .. 'born', now)
redis.call('HSET', P .. 'nodes', node, now + ttl)
for i = 3, #ARGV, 3 do
  redis.call('HSET', P .. 'fver', ARGV[i], ARGV[i + 1])
  redis.call('HSET', P .. 'funknown', ARGV[i], ARGV[i + 2])
  redis.call('SADD', P .. 'fnodes:' .. ARGV[i], node)
  redis.call('SADD', P .. 'nodefns:' .. node, ARGV[i])
end
return 'OK'
--@@ deregister: ARGV = node, only_expired ('1'/'0'); returns 1 while given-back work remains
local node = ARGV[1]
local exp = redis.call('HGET', P .. 'nodes', node)
if exp and (ARGV[2] ~= '1' or tonumber(exp) <= now_ms()) then detach(node) end
return reclaim_step(RECLAIM_BATCH)
--@@ reclaim: ARGV = (none); gives back a batch of removed nodes' work; returns 1 while more remains
return reclaim_step(RECLAIM_BATCH)
--@@ heartbeat: ARGV = node, ttl_ms, info; returns {1 if known else 0, forgets so far}
local fgen = tonumber(redis.call('GET', P .. 'fgen') or '0')
if redis.call('HEXISTS', P .. 'nodes', ARGV[1]) == 0 then return {0, fgen} end
redis.call('HSET', P .. 'nodes', ARGV[1], now_ms() + tonumber(ARGV[2]))
redis.call('HSET', P .. 'info', ARGV[1], ARGV[3])
return {1, fgen}
--@@ reap: ARGV = (none); returns '1' while work remains (call again), else '0'; then the nodes reaped
-- Finishes giving back the work of removed nodes first; then detaches at most REAP_NODES_MAX
-- dead nodes, in id order (the embedded statekeeper's order).
if reclaim_step(RECLAIM_BATCH) == 1 then return {'1'} end
local now = now_ms()
local all = redis.call('HGETALL', P .. 'nodes')
local dead = {}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) <= now then table.insert(dead, all[i]) end
end
table.sort(dead)
local out = {'0'}
for i = 1, math.min(#dead, REAP_NODES_MAX) do
  detach(dead[i])
  table.insert(out, dead[i])
end
if #out > 1 then out[1] = '1' end
return out
--@@ live_nodes: ARGV = (none); returns now, then node, expiry, info triples
local now = now_ms()
local all = redis.call('HGETALL', P .. 'nodes')
local out = {tostring(now)}
for i = 1, #all, 2 do
  if tonumber(all[i + 1]) > now then
    table.insert(out, all[i])
    table.insert(out, all[i + 1])
    table.insert(out, redis.call('HGET', P .. 'info', all[i]) or '')
  end
end
return out
--@@ declare_pool: ARGV = pool, parent ('' for none), node
local pool, parent, node = ARGV[1], ARGV[2], ARGV[3]
if parent ~= '' and redis.call('EXISTS', P .. 'pool:' .. parent) == 0 then return 'UNKNOWN_POOL' end
if parent ~= '' then
  redis.call('HSET', P .. 'pool:' .. pool, 'parent', parent)
else
  redis.call('HSETNX', P .. 'pool:' .. pool, 'parent', '')
end
redis.call('HSETNX', P .. 'pool:' .. pool, 'next', 0)
if parent ~= '' and not redis.call('LPOS', P .. 'members:' .. parent, 'pool:' .. pool) then
  redis.call('RPUSH', P .. 'members:' .. parent, 'pool:' .. pool)
end
redis.call('SADD', P .. 'pdist:' .. pool, node)
redis.call('SADD', P .. 'nodepools:' .. node, pool)
return 'OK'
--@@ join_pool: ARGV = pool, member, node
local pool, member, node = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', P .. 'pool:' .. pool) == 0 then return 'UNKNOWN_POOL' end
if not redis.call('LPOS', P .. 'members:' .. pool, member) then redis.call('RPUSH', P .. 'members:' .. pool, member) end
redis.call('HSET', P .. 'qowner', member, node)
redis.call('HSET', P .. 'qpool', member, pool)
-- Only a registered node's queues are given back when it goes (as in the embedded one).
if redis.call('HEXISTS', P .. 'nodes', node) == 1 then redis.call('SADD', P .. 'nodequeues:' .. node, member) end
return 'OK'
--@@ leave_pool: ARGV = pool, member
-- The queue stays its node's: what it holds is given back when the node goes.
local pool, member = ARGV[1], ARGV[2]
redis.call('LREM', P .. 'members:' .. pool, 0, member)
redis.call('HDEL', P .. 'credits:' .. pool, member)
if redis.call('EXISTS', P .. 'pool:' .. pool) == 1 then redis.call('HSET', P .. 'pool:' .. pool, 'next', 0) end
return 'OK'
--@@ submit: ARGV = id, request, fn, queue, front ('1'/'0'), waiter, unknown-function outcome, in_flight_max, node ttl ms, tree ('' for none), depth, requests_max, tree ttl ms, VERSION:NAME
-- A memoized outcome comes back with its remaining time to live in ms (-1: none).
local id, request, fn, queue, front, waiter = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1', ARGV[6]
local tree, vk = ARGV[10], ARGV[14]
local res = redis.call('GET', P .. 'res:' .. id)
if res then return {'DONE', res, tostring(redis.call('PTTL', P .. 'res:' .. id))} end
-- A worker queue whose node is gone takes no more work: its pool does instead.
if not pool_of_queue(queue) and not redis.call('HGET', P .. 'qowner', queue) then
  local pool = redis.call('HGET', P .. 'qpool', queue)
  if pool then queue, front = 'pool:' .. pool, false end
end
local rkey = P .. 'req:' .. id
if redis.call('HEXISTS', P .. 'fver', fn) == 0 then
  -- A grid younger than one node lease may not have heard from every node yet (it just
  -- started, or Redis came back empty): nobody serving `fn` is not final until then.
  local born = tonumber(redis.call('GET', P .. 'born') or '0')
  if born == 0 or now_ms() - born < tonumber(ARGV[9]) then return {'NOT_YET'} end
  if redis.call('EXISTS', rkey) == 1 then fail_waiters(id, ARGV[7]) end
  return {'UNKNOWN'}
end
local ended, tree_n, root_node = tree_status(tree, ARGV[11] == '0')
if ended ~= '' then return {'ENDED', ended} end
local owner = redis.call('HGET', rkey, 'owner')
if owner then
  redis.call('SADD', P .. 'wait:' .. id, waiter)
  if owner ~= '' and not node_alive(owner, now_ms()) then
    redis.call('ZREM', P .. 'claims:' .. owner, id)
    requeue_lost(id)
  elseif owner == '' and front then
    place(queue, id, true, 0)
  end
  if tree ~= '' then note_join(id, tree) end
  return {'JOINED'}
end
if tonumber(redis.call('GET', P .. 'inflight') or '0') >= tonumber(ARGV[8]) then return {'OVERLOADED'} end
if tree ~= '' then
  -- A new request counts against its tree's budget; past it, the whole tree ends.
  local tkey = P .. 'tree:' .. tree
  if tree_n >= tonumber(ARGV[12]) then
    end_tree(tree, 'B' .. ARGV[12])
    redis.call('PEXPIRE', tkey, ARGV[13])
    return {'ENDED', 'B' .. ARGV[12]}
  end
  redis.call('HINCRBY', tkey, 'n', 1)
  if ARGV[11] == '0' and not root_node then
    redis.call('HSET', tkey, 'rootnode', waiter, 'rootreq', id)
  end
  redis.call('PEXPIRE', tkey, ARGV[13])
end
local home = queue
local pool = redis.call('HGET', P .. 'qpool', queue)
if pool then home = 'pool:' .. pool end
local ep = redis.call('HGET', P .. 'fvep', vk) or '0'
redis.call('HSET', rkey, 'req', request, 'fn', fn, 'owner', '', 'hoisted', '0', 'home', home, 'tree', tree,
  'vk', vk, 'ep', ep)
if tree ~= '' and ARGV[11] == '0' then redis.call('HSET', rkey, 'root', tree) end
redis.call('SADD', P .. 'fnreq:' .. fn, id)
redis.call('INCR', P .. 'inflight')
redis.call('SADD', P .. 'wait:' .. id, waiter)
place(queue, id, front, 0)
return {'QUEUED'}
--@@ claim: ARGV = queue, owner, max; returns the forgets stamp, then request, lost count pairs
return claim(ARGV[1], ARGV[2], tonumber(ARGV[3]))
--@@ release_claims: ARGV = owner, cursor ('' to start), kept ids...
-- Looks at up to RECLAIM_BATCH claims after `cursor`, in id order; returns {released, next
-- cursor ('' when done)}.
local owner, cursor = ARGV[1], ARGV[2]
local keep = {}
for i = 3, #ARGV do keep[ARGV[i]] = true end
local from = '-'
if cursor ~= '' then from = '(' .. cursor end
local ids = redis.call('ZRANGEBYLEX', P .. 'claims:' .. owner, from, '+', 'LIMIT', 0, RECLAIM_BATCH)
local released = 0
for _, id in ipairs(ids) do
  if not keep[id] then
    redis.call('ZREM', P .. 'claims:' .. owner, id)
    if redis.call('HGET', P .. 'req:' .. id, 'owner') == owner then
      requeue(id, true)
      released = released + 1
    end
  end
end
local next_cursor = ''
if #ids == RECLAIM_BATCH then next_cursor = ids[#ids] end
return {released, next_cursor}
--@@ complete: ARGV = id, outcome, memoize ('1'/'0'), local node, result ttl ms (0 = none), results max, VERSION:NAME, forgets stamp
-- Returns {local node waits (1/0), memoized (1/0)}.
local local_waits, memoized =
  complete(ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8])
return {local_waits, memoized}
--@@ forget: ARGV = id, VERSION:NAME; returns 1 when an outcome was memoized
local id, vk = ARGV[1], ARGV[2]
local forgotten = redis.call('DEL', P .. 'res:' .. id)
redis.call('ZREM', P .. 'resz', id .. vk)
redis.call('SREM', P .. 'resv:' .. vk, id)
-- An evaluation in flight now memoizes nothing when it completes.
if redis.call('EXISTS', P .. 'req:' .. id) == 1 then redis.call('HSET', P .. 'req:' .. id, 'ep', '-1') end
broadcast_forget('F' .. id)
return forgotten
--@@ forget_all: ARGV = VERSION:NAME, first step ('1'/'0'); returns {forgotten, 1 while more remain}
-- The first step moves the version to a new epoch (evaluations in flight memoize nothing) and
-- tells every node; each step removes at most FORGET_BATCH outcomes.
local vk = ARGV[1]
if ARGV[2] == '1' then
  redis.call('HINCRBY', P .. 'fvep', vk, 1)
  broadcast_forget('A' .. vk)
end
local forgotten = 0
for _, id in ipairs(redis.call('SPOP', P .. 'resv:' .. vk, FORGET_BATCH)) do
  forgotten = forgotten + redis.call('DEL', P .. 'res:' .. id)
  redis.call('ZREM', P .. 'resz', id .. vk)
end
return {forgotten, redis.call('EXISTS', P .. 'resv:' .. vk)}
--@@ cancel_tree: ARGV = root id, waiter; returns 1 when the tree was cancelled
local id, waiter = ARGV[1], ARGV[2]
local rkey = P .. 'req:' .. id
if redis.call('EXISTS', rkey) == 0 then return 0 end
redis.call('SREM', P .. 'wait:' .. id, waiter)
if redis.call('SCARD', P .. 'wait:' .. id) > 0 then return 0 end
local tree = redis.call('HGET', rkey, 'tree')
if not tree or tree == '' then return 0 end
local h = redis.call('HMGET', P .. 'tree:' .. tree, 'end', 'rootreq')
if h[2] ~= id or (h[1] and h[1] ~= '') then return 0 end
end_tree(tree, 'C')
return 1
--@@ volunteer: ARGV = pool, member, credits
local pool, member, credits = ARGV[1], ARGV[2], tonumber(ARGV[3])
if redis.call('EXISTS', P .. 'pool:' .. pool) == 0 then return 'UNKNOWN_POOL' end
if credits > 0 then
  redis.call('HSET', P .. 'credits:' .. pool, member, credits)
else
  redis.call('HDEL', P .. 'credits:' .. pool, member)
end
for _, ancestor in ipairs(ancestors(pool)) do distribute(ancestor, 1000000000) end
return 'OK'
--@@ distribute: ARGV = pool, max
return distribute(ARGV[1], tonumber(ARGV[2]))
--@@ hoist: ARGV = pool, max
local pool, max = ARGV[1], tonumber(ARGV[2])
local budget = math.min(max, idle(pool, 0))
if budget <= 0 then return 0 end
local members = redis.call('LRANGE', P .. 'members:' .. pool, 0, -1)
local sized = {}
for i, m in ipairs(members) do table.insert(sized, {m, redis.call('LLEN', P .. 'q:' .. m), i}) end
-- Busiest first; ties in member order (table.sort is not stable; the embedded sort is).
table.sort(sized, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[3] < b[3]) end)
local copied = {}
for _, entry in ipairs(sized) do
  local member, len = entry[1], entry[2]
  if #copied >= budget or len < 2 then break end
  local share = math.min(math.floor(len / 2), budget - #copied)
  local tail = redis.call('LRANGE', P .. 'q:' .. member, -math.min(len, SCAN_MAX), -1)
  local taken = 0
  for i = #tail, 1, -1 do
    if taken >= share then break end
    local rkey = P .. 'req:' .. tail[i]
    local h = redis.call('HMGET', rkey, 'owner', 'hoisted')
    if h[1] == '' and h[2] == '0' then
      redis.call('HSET', rkey, 'hoisted', '1')
      table.insert(copied, tail[i])
      taken = taken + 1
    end
  end
end
for _, id in ipairs(copied) do place('pool:' .. pool, id, false, 0) end
if #copied > 0 then redis.call('HINCRBY', P .. 'pstat:' .. pool, 'hoisted', #copied) end
return #copied
--@@ pool_counters: ARGV = pool
local pool = ARGV[1]
if redis.call('EXISTS', P .. 'pool:' .. pool) == 0 then return 'UNKNOWN_POOL' end
local h = redis.call('HMGET', P .. 'pstat:' .. pool, 'handed_off', 'hoisted')
return {tonumber(h[1] or '0') or 0, tonumber(h[2] or '0') or 0, redis.call('LLEN', P .. 'q:pool:' .. pool)}
--@@ complete_and_claim: ARGV = id, outcome, memoize, local node, result ttl ms, queue, max, results max, VERSION:NAME, forgets stamp
-- Returns {local node waits, memoized, {forgets stamp, claimed (request, lost count)...}}.
local id, outcome, memoize, localnode, ttl = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], tonumber(ARGV[5])
local local_waits, memoized = complete(id, outcome, memoize, localnode, ttl, tonumber(ARGV[8]), ARGV[9], ARGV[10])
return {local_waits, memoized, claim(ARGV[6], localnode, tonumber(ARGV[7]))}
