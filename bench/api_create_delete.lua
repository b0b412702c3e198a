-- wrk script for bench/api.py: each connection alternates POST /v1/vms (a
-- new name) and DELETE /v1/vms/NAME of that VM. Run it with one connection
-- per thread so a create is answered before its delete is sent.
local token = os.getenv("BENCH_TOKEN")
local kernel = os.getenv("BENCH_KERNEL")
local threads = 0
local counter = 0

function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end

request = function()
  counter = counter + 1
  local name = "bench-" .. tid .. "-" .. math.floor((counter + 1) / 2)
  local auth = { ["Authorization"] = "Bearer " .. token }
  if counter % 2 == 1 then
    auth["Content-Type"] = "application/json"
    local body = '{"name":"' .. name .. '","kernel":"' .. kernel .. '","memory_mib":32,"accel":"emu"}'
    return wrk.format("POST", "/v1/vms", auth, body)
  end
  return wrk.format("DELETE", "/v1/vms/" .. name, auth)
end

response = function(status, headers, body)
  if status ~= 201 and status ~= 204 then
    io.stderr:write("unexpected HTTP " .. status .. " (thread " .. tid .. ", request " .. counter .. "): " .. body .. "\n")
  end
end
