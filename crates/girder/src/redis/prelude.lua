-- Shared by every girder script. KEYS[1] is the grid's key prefix, `girder:{NAMESPACE}:`;
-- every key a script touches starts with it, so all of them hash to one cluster slot.
-- Keys (P = prefix):
--   P res:ID        memoized outcome (string, optional PX ttl)
--   P resz          memoized outcomes by when they were memoized (sorted set of ID .. VK, VK being
--                   the function version `VERSION:NAME`): the oldest go first past the count cap
--                   (bytes are Redis's `maxmemory`'s to bound)
--   P resv:VK       ids of the memoized outcomes of function version VK (set), for `forget_all`
--   P fvep          VK -> how many times all its outcomes were forgotten (hash; absent = 0)
--   P fgen          forgets so far (counter); heartbeats return it, so a node that missed a
--                   forget's notice clears its near cache; claims stamp requests with it, so a
--                   completion of a request no longer in flight memoizes only if it did not move
--   P req:ID        request in flight (hash: req, fn, owner ('' while pending), hoisted, home,
--                   vk, ep = fvep of vk when submitted ('-1' once forgotten: its outcome is not
--                   memoized), lost = times its claiming node was lost)
--   P wait:ID       nodes waiting for ID (set)
--   P q:QUEUE       queue of ids (list); QUEUE is `pool:NAME` or `worker:ID`
--   P pool:NAME     pool (hash: parent, next);  P members:NAME (list);  P credits:NAME (hash)
--   P pstat:NAME    pool counters (hash: handed_off, hoisted);  P pdist:NAME nodes running its distributor (set)
--   P qowner / P qpool   worker queue -> owning node / pool (hashes)
--   P nodes         node -> lease expiry in ms (hash);  P info  node -> reported NodeInfo (hash)
--   P nodefns:N / nodequeues:N / nodepools:N   what node N holds (sets)
--   P claims:N      requests node N claimed (sorted set, all scores 0: in id order)
--   P fver          function -> version (hash);  P fnodes:F  nodes serving F (set)
--   P inbox:N       events for node N (list): 'D' .. ID .. outcome, 'W' .. QUEUE, 'F' .. ID (forgotten),
--                   'A' .. VK (all of VK forgotten)
--   P inflight      number of requests in flight (counter);  P born  when this grid state began (ms)
--   P fnreq:F       requests in flight for function F (set);  P funknown  F -> outcome for "nobody serves F"
--   P tree:T        call tree T (16 hex digits; hash: n = new requests so far, rootnode, rootreq,
--                   end = '' while running, 'C' cancelled, 'B<max>' over budget); PX TREE_TTL_MS
--                   after its last new request. Requests carry their tree in req:ID's `tree`,
--                   and a tree's root also in `root`.
--   P reclaim       removed nodes whose work is still being given back (list of job ids, oldest first)
--   P reclaiming    node -> its pending job id (hash);  P rcseq  job id counter
--   P rc:J          job J (hash: node, u:F -> unknown outcome of F);  P rc:J:fails  functions whose
--                   requests fail (list), their ids in P rc:J:fail:F (set);  P rc:J:run  its claims
--                   (sorted set);  P rc:J:queues  its queues by name (list), their ids in P rc:J:q:Q (list)
-- Every script does bounded work: removing a node detaches it in one step (its functions,
-- queues and pools, few) and gives its work back in later steps of at most RECLAIM_BATCH
-- entries, which the Rust side runs until none is left (`reclaim`, `reap`).
local P = KEYS[1]
local DEPTH_MAX = 16
local SCAN_MAX = 1000
local RECLAIM_BATCH = 1000
local REAP_NODES_MAX = 16
local CLAIM_DROP_MAX = 1000
local FORGET_BATCH = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function pool_of_queue(queue)
  if string.sub(queue, 1, 5) == 'pool:' then return string.sub(queue, 6) end
  return nil
end

local function node_alive(node, now)
  local exp = redis.call('HGET', P .. 'nodes', node)
  return exp and tonumber(exp) > now
end

local function push_event(node, event)
  local key = P .. 'inbox:' .. node
  local len = redis.call('RPUSH', key, event)
  if len > INBOX_LEN_MAX then redis.call('LTRIM', key, len - INBOX_LEN_MAX, -1) end
end

local function notify(queue)
  local owner = redis.call('HGET', P .. 'qowner', queue)
  if owner then
    push_event(owner, 'W' .. queue)
    return
  end
  local pool = pool_of_queue(queue)
  if pool then
    for _, node in ipairs(redis.call('SMEMBERS', P .. 'pdist:' .. pool)) do push_event(node, 'W' .. queue) end
  end
end

local function capacity(pool, member, fn, depth)
  local child = pool_of_queue(member)
  if child then
    if depth >= DEPTH_MAX or redis.call('LLEN', P .. 'q:' .. member) > 0 then return 0 end
    local total = 0
    for _, m in ipairs(redis.call('LRANGE', P .. 'members:' .. child, 0, -1)) do
      total = total + capacity(child, m, fn, depth + 1)
    end
    return total
  end
  local credits = tonumber(redis.call('HGET', P .. 'credits:' .. pool, member) or '0')
  if credits <= 0 then return 0 end
  local owner = redis.call('HGET', P .. 'qowner', member)
  if owner and redis.call('SISMEMBER', P .. 'fnodes:' .. fn, owner) == 1 then return credits end
  return 0
end

-- The next member of `pool` that can take a request for `fn`, round robin; charges it a credit.
local function pick_member(pool, fn, depth)
  local members = redis.call('LRANGE', P .. 'members:' .. pool, 0, -1)
  local n = #members
  if n == 0 then return nil end
  local start = tonumber(redis.call('HGET', P .. 'pool:' .. pool, 'next') or '0') % n
  for k = 0, n - 1 do
    local i = (start + k) % n
    local m = members[i + 1]
    if capacity(pool, m, fn, depth) > 0 then
      redis.call('HSET', P .. 'pool:' .. pool, 'next', (i + 1) % n)
      redis.call('HINCRBY', P .. 'pstat:' .. pool, 'handed_off', 1)
      if not pool_of_queue(m) then
        if redis.call('HINCRBY', P .. 'credits:' .. pool, m, -1) <= 0 then
          redis.call('HDEL', P .. 'credits:' .. pool, m)
        end
      end
      return m
    end
  end
  return nil
end

-- Puts `id` into `queue`; a pool queue with an idle member hands it straight down.
local function place(queue, id, front, depth)
  local pool = pool_of_queue(queue)
  if pool and depth < DEPTH_MAX and redis.call('LLEN', P .. 'q:' .. queue) == 0 then
    local fn = redis.call('HGET', P .. 'req:' .. id, 'fn')
    if fn then
      local m = pick_member(pool, fn, depth)
      if m then return place(m, id, false, depth + 1) end
    end
  end
  local len
  if front then
    len = redis.call('LPUSH', P .. 'q:' .. queue, id)
  else
    len = redis.call('RPUSH', P .. 'q:' .. queue, id)
  end
  -- Consumers drain a queue before they wait on it, so waking them on empty -> non-empty is enough.
  if len == 1 then notify(queue) end
end

local function requeue(id, front)
  local rkey = P .. 'req:' .. id
  redis.call('HSET', rkey, 'owner', '')
  local home = redis.call('HGET', rkey, 'home')
  if home then place(home, id, front, 0) end
end

-- Puts a request whose claiming node was lost back in flight, counting the loss.
local function requeue_lost(id)
  redis.call('HINCRBY', P .. 'req:' .. id, 'lost', 1)
  requeue(id, true)
end

-- Tells every registered node that memoized outcomes were forgotten ('F' .. ID or 'A' .. VK),
-- so they drop them from their near caches.
local function broadcast_forget(event)
  redis.call('INCR', P .. 'fgen')
  for _, node in ipairs(redis.call('HKEYS', P .. 'nodes')) do push_event(node, event) end
end

-- Credits of `pool`'s members whatever the function: an upper bound of what it can take now.
local function idle(pool, depth)
  local total = 0
  for _, c in ipairs(redis.call('HVALS', P .. 'credits:' .. pool)) do total = total + tonumber(c) end
  if depth < DEPTH_MAX then
    for _, m in ipairs(redis.call('LRANGE', P .. 'members:' .. pool, 0, -1)) do
      local child = pool_of_queue(m)
      if child and redis.call('LLEN', P .. 'q:' .. m) == 0 then total = total + idle(child, depth + 1) end
    end
  end
  return total
end

-- Hands queued work of `pool` to members that can take it. Stops as soon as no credit is
-- left, and tries each function once per round, so a long queue costs only what moves.
local function distribute(pool, max)
  local budget = math.min(max, idle(pool, 0))
  if budget <= 0 then return 0 end
  local qkey = P .. 'q:pool:' .. pool
  -- Look a little past the budget, for requests no member can take (other functions).
  local head = redis.call('LRANGE', qkey, 0, math.min(SCAN_MAX, budget * 4 + 16) - 1)
  if #head == 0 then return 0 end
  local kept = {}
  local blocked = {}
  local moved = 0
  local scanned = 0
  for _, id in ipairs(head) do
    if moved >= budget then break end
    scanned = scanned + 1
    local h = redis.call('HMGET', P .. 'req:' .. id, 'fn', 'owner')
    if h[1] and h[2] == '' then
      local m = nil
      if not blocked[h[1]] then m = pick_member(pool, h[1], 0) end
      if m then
        place(m, id, false, 1)
        moved = moved + 1
      else
        blocked[h[1]] = true
        table.insert(kept, id)
      end
    end
  end
  if scanned > 0 then
    redis.call('LTRIM', qkey, scanned, -1)
    for i = #kept, 1, -1 do redis.call('LPUSH', qkey, kept[i]) end
  end
  return moved
end

local function ancestors(pool)
  local chain = {pool}
  for _ = 1, DEPTH_MAX do
    local parent = redis.call('HGET', P .. 'pool:' .. chain[#chain], 'parent')
    if not parent or parent == '' then break end
    for _, p in ipairs(chain) do
      if p == parent then return chain end
    end
    table.insert(chain, parent)
  end
  return chain
end

-- Forgets request `id` and sends `event` to every registered node waiting for it.
local function remove_request(id, event)
  local fn = redis.call('HGET', P .. 'req:' .. id, 'fn')
  if fn then redis.call('SREM', P .. 'fnreq:' .. fn, id) end
  local waiters = redis.call('SMEMBERS', P .. 'wait:' .. id)
  redis.call('DEL', P .. 'wait:' .. id, P .. 'req:' .. id)
  redis.call('DECR', P .. 'inflight')
  for _, w in ipairs(waiters) do
    if redis.call('HEXISTS', P .. 'nodes', w) == 1 then push_event(w, event) end
  end
end

local function fail_waiters(id, outcome)
  remove_request(id, 'D' .. id .. outcome)
end

-- Whether call tree `tree` has not ended (a tree without a record made no request yet).
local function tree_runs(tree)
  local ended = redis.call('HGET', P .. 'tree:' .. tree, 'end')
  return not ended or ended == ''
end

-- Ends call tree `tree` with `code` ('C' cancelled, 'B<max>' over budget) and tells every live
-- node. First the trees whose callers joined its requests (`tree:T:joined`, at most
-- ADOPTIONS_MAX) adopt those still in flight, if they still run: every node hears 'R' + id +
-- old tree + new tree before the tree's end, so their evaluations go on.
local function end_tree(tree, code)
  local tkey = P .. 'tree:' .. tree
  redis.call('HSET', tkey, 'end', code)
  local nodes = redis.call('HKEYS', P .. 'nodes')
  local joined = redis.call('HGETALL', tkey .. ':joined')
  for i = 1, #joined, 2 do
    local id, adopter = joined[i], joined[i + 1]
    local rkey = P .. 'req:' .. id
    if redis.call('HGET', rkey, 'tree') == tree and tree_runs(adopter) then
      redis.call('HSET', rkey, 'tree', adopter)
      for _, node in ipairs(nodes) do push_event(node, 'R' .. id .. tree .. adopter) end
    end
  end
  redis.call('DEL', tkey .. ':joined')
  for _, node in ipairs(nodes) do push_event(node, 'T' .. tree .. code) end
end

-- A caller of tree `joiner` joined the request `id` of another, running tree: when that tree
-- ends, `joiner`'s adopts the request (see end_tree). At most ADOPTIONS_MAX per tree.
local ADOPTIONS_MAX = 64
local function note_join(id, joiner)
  local tree = redis.call('HGET', P .. 'req:' .. id, 'tree')
  if not tree or tree == '' or tree == joiner or redis.call('EXISTS', P .. 'tree:' .. tree) == 0
    or not tree_runs(tree) then return end
  local jkey = P .. 'tree:' .. tree .. ':joined'
  if redis.call('HLEN', jkey) >= ADOPTIONS_MAX and redis.call('HEXISTS', jkey, id) == 0 then return end
  redis.call('HSET', jkey, id, joiner)
  -- Kept as long as the tree's record (an hour after its last new request at most).
  local ttl = redis.call('PTTL', P .. 'tree:' .. tree)
  redis.call('PEXPIRE', jkey, ttl > 0 and ttl or 3600000)
end

-- When `id` is the root of `tree`, nothing of the tree is needed any more: a tree of one
-- request is forgotten at once; a bigger one ends ('C', told to nobody: its stragglers are
-- dropped when claimed or refused when they submit) and is forgotten TREE_DONE_TTL_MS later.
local TREE_DONE_TTL_MS = 10000
local function root_done(tree, id)
  local tkey = P .. 'tree:' .. tree
  local h = redis.call('HMGET', tkey, 'rootreq', 'n', 'end')
  if h[1] ~= id then return end
  if tonumber(h[2] or '0') <= 1 then
    redis.call('DEL', tkey)
  elseif not h[3] or h[3] == '' then
    redis.call('HSET', tkey, 'end', 'C')
    redis.call('PEXPIRE', tkey, TREE_DONE_TTL_MS)
  end
end

-- How `tree` ended ('' while it runs), then, while it runs, how many requests it created
-- and its root's caller's node (or false). With `check_root`, a tree whose root's caller's
-- node is gone, reaped or deregistered (nodes reap each other every heartbeat), ends now.
-- (A nested submission does not check: its claim does, so growth stops either way.)
local function tree_status(tree, check_root)
  if not tree or tree == '' then return '', 0, false end
  local h = redis.call('HMGET', P .. 'tree:' .. tree, 'end', 'n', 'rootnode')
  if h[1] and h[1] ~= '' then return h[1], 0, false end
  if check_root and h[3] and h[3] ~= '' and redis.call('HEXISTS', P .. 'nodes', h[3]) == 0 then
    end_tree(tree, 'C')
    return 'C', 0, false
  end
  return '', tonumber(h[2] or '0'), h[3]
end

local function tree_end(tree)
  local ended = tree_status(tree, true)
  return ended
end

-- The first step of removing a node: it leaves the membership, the directory and its pools
-- at once; what it held becomes a reclaim job, given back by `reclaim_step`. Bounded by the
-- node's functions, queues and pools. The embedded statekeeper (`detach`) does the same.
local function detach(node)
  local job = tostring(redis.call('INCR', P .. 'rcseq'))
  local J = P .. 'rc:' .. job
  redis.call('HSET', J, 'node', node)
  local fns = redis.call('SMEMBERS', P .. 'nodefns:' .. node)
  table.sort(fns)
  for _, fn in ipairs(fns) do
    redis.call('SREM', P .. 'fnodes:' .. fn, node)
    if redis.call('SCARD', P .. 'fnodes:' .. fn) == 0 then
      -- The last node serving it is gone: whoever waits for it learns so now.
      redis.call('HDEL', P .. 'fver', fn)
      local unknown = redis.call('HGET', P .. 'funknown', fn)
      if unknown and redis.call('EXISTS', P .. 'fnreq:' .. fn) == 1 then
        redis.call('RENAME', P .. 'fnreq:' .. fn, J .. ':fail:' .. fn)
        redis.call('HSET', J, 'u:' .. fn, unknown)
        redis.call('RPUSH', J .. ':fails', fn)
      end
      redis.call('DEL', P .. 'fnreq:' .. fn)
      redis.call('HDEL', P .. 'funknown', fn)
    end
  end
  redis.call('HDEL', P .. 'nodes', node)
  redis.call('HDEL', P .. 'info', node)
  for _, pool in ipairs(redis.call('SMEMBERS', P .. 'nodepools:' .. node)) do
    redis.call('SREM', P .. 'pdist:' .. pool, node)
  end
  -- Detach its queues first, so nothing given back is handed to them.
  local queues = redis.call('SMEMBERS', P .. 'nodequeues:' .. node)
  table.sort(queues)
  for _, q in ipairs(queues) do
    local pool = redis.call('HGET', P .. 'qpool', q)
    if pool then
      redis.call('LREM', P .. 'members:' .. pool, 0, q)
      redis.call('HDEL', P .. 'credits:' .. pool, q)
      redis.call('HSET', P .. 'pool:' .. pool, 'next', 0)
    end
    redis.call('HDEL', P .. 'qowner', q)
    if redis.call('EXISTS', P .. 'q:' .. q) == 1 then
      redis.call('RENAME', P .. 'q:' .. q, J .. ':q:' .. q)
      redis.call('RPUSH', J .. ':queues', q)
    end
  end
  if redis.call('EXISTS', P .. 'claims:' .. node) == 1 then
    redis.call('RENAME', P .. 'claims:' .. node, J .. ':run')
  end
  redis.call('DEL', P .. 'nodefns:' .. node, P .. 'nodepools:' .. node, P .. 'nodequeues:' .. node,
    P .. 'inbox:' .. node)
  redis.call('RPUSH', P .. 'reclaim', job)
  redis.call('HSET', P .. 'reclaiming', node, job)
end

-- Gives back up to `budget` entries of what removed nodes held, oldest job first and in the
-- embedded statekeeper's order: requests of functions nobody serves fail; then the node's
-- claims, in id order, go back to the front of their pools; then the pending entries of its
-- queues, by queue name, front to back, go to the back of their pools. Returns 1 while work
-- remains.
local function reclaim_step(budget)
  while budget > 0 do
    local job = redis.call('LINDEX', P .. 'reclaim', 0)
    if not job then return 0 end
    local J = P .. 'rc:' .. job
    local node = redis.call('HGET', J, 'node') or ''
    local fn = redis.call('LINDEX', J .. ':fails', 0)
    local q = redis.call('LINDEX', J .. ':queues', 0)
    if fn then
      local unknown = redis.call('HGET', J, 'u:' .. fn)
      local ids = redis.call('SPOP', J .. ':fail:' .. fn, budget)
      budget = budget - math.max(1, #ids)
      for _, id in ipairs(ids) do
        if unknown and redis.call('EXISTS', P .. 'req:' .. id) == 1 then fail_waiters(id, unknown) end
      end
      if redis.call('EXISTS', J .. ':fail:' .. fn) == 0 then redis.call('LPOP', J .. ':fails') end
    elseif redis.call('EXISTS', J .. ':run') == 1 then
      local popped = redis.call('ZPOPMIN', J .. ':run', budget)
      budget = budget - math.max(1, #popped / 2)
      for i = 1, #popped, 2 do
        local id = popped[i]
        if redis.call('HGET', P .. 'req:' .. id, 'owner') == node then requeue_lost(id) end
      end
    elseif q then
      local ids = redis.call('LPOP', J .. ':q:' .. q, budget) or {}
      budget = budget - math.max(1, #ids)
      for _, id in ipairs(ids) do
        if redis.call('HGET', P .. 'req:' .. id, 'owner') == '' then requeue(id, false) end
      end
      if redis.call('EXISTS', J .. ':q:' .. q) == 0 then redis.call('LPOP', J .. ':queues') end
    else
      redis.call('DEL', J, J .. ':fails', J .. ':queues')
      redis.call('LPOP', P .. 'reclaim')
      if redis.call('HGET', P .. 'reclaiming', node) == job then redis.call('HDEL', P .. 'reclaiming', node) end
      budget = budget - 1
    end
  end
  if redis.call('LLEN', P .. 'reclaim') > 0 then return 1 end
  return 0
end

-- Claims up to `max` pending requests from the front of `queue` for `owner`; returns the
-- grid's count of forgets (the requests' stamp), then each request followed by its lost count.
local function claim(queue, owner, max)
  local qkey = P .. 'q:' .. queue
  local out = {redis.call('GET', P .. 'fgen') or '0'}
  -- A node the grid declared dead holds no claims: it registers again first.
  if max <= 0 or redis.call('HEXISTS', P .. 'nodes', owner) == 0 then return out end
  local dropped = 0
  -- Two entries in `out` per request claimed, after the stamp.
  while #out < 2 * max + 1 do
    local id = redis.call('LPOP', qkey)
    if not id then break end
    local rkey = P .. 'req:' .. id
    local h = redis.call('HMGET', rkey, 'owner', 'req', 'tree', 'lost')
    if h[2] and h[1] == '' then
      local ended = tree_end(h[3])
      if ended ~= '' then
        -- Its tree ended: dropped, and its waiters are told why.
        remove_request(id, 'K' .. id .. ended)
        dropped = dropped + 1
        if dropped >= CLAIM_DROP_MAX then
          -- Bounded work per call: the queue's owner comes back for the rest.
          notify(queue)
          break
        end
      else
        redis.call('HSET', rkey, 'owner', owner)
        redis.call('ZADD', P .. 'claims:' .. owner, 0, id)
        table.insert(out, h[2])
        table.insert(out, h[4] or '0')
      end
    end
  end
  return out
end

-- Memoizes `outcome` as the result of `id` of function version `vk` (for `ttl` ms, 0 = no
-- ttl); past `count_max` results, forgets the oldest, at most EVICT_MAX per call (each call
-- adds one, so the store stays within its cap). Results that expired still count until
-- evicted; so do their entries in `resv:VK`, which eviction removes too.
local EVICT_MAX = 16
local function memoize_result(id, outcome, ttl, count_max, vk)
  local key = P .. 'res:' .. id
  if ttl > 0 then
    redis.call('SET', key, outcome, 'PX', ttl)
  else
    redis.call('SET', key, outcome)
  end
  redis.call('SADD', P .. 'resv:' .. vk, id)
  local rkey = P .. 'resz'
  redis.call('ZADD', rkey, now_ms(), id .. vk)
  local over = redis.call('ZCARD', rkey) - count_max
  if over > 0 then
    local popped = redis.call('ZPOPMIN', rkey, math.min(over, EVICT_MAX))
    -- Member, score pairs; a member is the 64 hex digits of the id, then its VK.
    for i = 1, #popped, 2 do
      local old, old_vk = string.sub(popped[i], 1, 64), string.sub(popped[i], 65)
      redis.call('DEL', P .. 'res:' .. old)
      if old_vk ~= '' then redis.call('SREM', P .. 'resv:' .. old_vk, old) end
    end
  end
end

-- Records an outcome of `id` (function version `vk`, claimed when the grid had seen `forgets`
-- forgets) and wakes the waiting nodes; returns 1 when `localnode` waits too, and 1 when the
-- outcome was memoized: for a request in flight, unless it was forgotten since it was
-- submitted; for one no longer in flight (a duplicate completion, or Redis lost its state),
-- unless anything was forgotten since it was claimed.
local function complete(id, outcome, memoize, localnode, ttl, count_max, vk, forgets)
  local rkey = P .. 'req:' .. id
  local h = redis.call('HMGET', rkey, 'owner', 'fn', 'root', 'vk', 'ep')
  local owner = h[1]
  if not owner then
    if memoize and forgets == (redis.call('GET', P .. 'fgen') or '0') then
      memoize_result(id, outcome, ttl, count_max, vk)
      return 0, 1
    end
    return 0, 0
  end
  local memoized = 0
  if memoize and h[4] and h[5] == (redis.call('HGET', P .. 'fvep', h[4]) or '0') then
    memoize_result(id, outcome, ttl, count_max, h[4])
    memoized = 1
  end
  if owner ~= '' then redis.call('ZREM', P .. 'claims:' .. owner, id) end
  if h[2] then redis.call('SREM', P .. 'fnreq:' .. h[2], id) end
  if h[3] then root_done(h[3], id) end
  redis.call('DEL', rkey)
  redis.call('DECR', P .. 'inflight')
  local waiters = redis.call('SMEMBERS', P .. 'wait:' .. id)
  redis.call('DEL', P .. 'wait:' .. id)
  local local_waits = 0
  for _, w in ipairs(waiters) do
    if w == localnode then
      local_waits = 1
    elseif redis.call('HEXISTS', P .. 'nodes', w) == 1 then
      push_event(w, 'D' .. id .. outcome)
    end
  end
  return local_waits, memoized
end
