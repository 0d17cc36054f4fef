"""The shell examples of seed 001, copied verbatim (/work/shared/seeds/001_bc2661ce686d3907.txt;
the key is the section). tests/seed001/test_seed001_examples.py runs them with bash and the
real curl, with only the host changed ("http://localhost:5000" -> the dispatcher's HTTP
address) unless a test says "seed:" and why.
"""

VERIFY_INSTALLATION = r"""# Health check
curl http://localhost:5000/api/health

# Expected response:
# {"status": "ok"}
"""

STREAMING_MODE = r"""curl -X POST http://localhost:5000/api/agent/run \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Open notepad and type Hello World",
    "sandbox_id": "box-123",
    "authentication": {
      "api_key": "sk-your-key",
      "org_id": "your-org-id"
    },
    "ark_apikey": "your-ark-key"
  }'
"""

ASYNC_MODE = r"""# Step 1: Submit task
TASK_ID=$(curl -X POST http://localhost:5000/api/agent/task/submit \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Search for Python tutorials on Google",
    "sandbox_id": "box-123",
    "authentication": {
      "api_key": "sk-your-key",
      "org_id": "your-org-id"
    },
    "ark_apikey": "your-ark-key"
  }' | jq -r '.task_id')

# Step 2: Poll status
curl http://localhost:5000/api/agent/task/status/$TASK_ID
"""

CREATING_SANDBOXES = r"""curl -X POST http://localhost:5000/api/sandbox/create \
  -H "Content-Type: application/json" \
  -d '{
    "name": "my-sandbox",
    "shape": "beijing-2c-4g-cpu",
    "maxLifeSeconds": 3600,
    "authentication": {
      "api_key": "sk-your-key",
      "org_id": "your-org-id"
    }
  }'

# Response includes sandbox_id for subsequent requests
"""

CANCELLING_TASKS = r"""# Cancel specific task
curl -X POST http://localhost:5000/api/agent/cancel \
  -d '{
    "task_id": "task-id-to-cancel",
    "authentication": {...}
  }'

# Cancel all active tasks
curl -X POST http://localhost:5000/api/agent/cancel \
  -d '{
    "authentication": {...}
  }'
"""

EXAMPLE1 = r"""curl -X POST http://localhost:5000/api/agent/run \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Open calculator and compute 123 * 456",
    "sandbox_id": "sbx-abc123",
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }'
"""

EXAMPLE2_SUBMIT = r"""# Submit task
curl -X POST http://localhost:5000/api/agent/task/submit \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Create a text file named report.txt with content: Meeting notes",
    "sandbox_id": "box-abc123",
    "max_steps": 50,
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }'
"""

EXAMPLE2_POLL = r"""curl http://localhost:5000/api/agent/task/status/550e8400-e29b-41d4-a716-446655440000
"""

EXAMPLE3 = r"""# Step 1: Create sandbox
SANDBOX_RESPONSE=$(curl -X POST http://localhost:5000/api/sandbox/create \
  -H "Content-Type: application/json" \
  -d '{
    "name": "automation-env",
    "shape": "beijing-2c-4g-cpu",
    "maxLifeSeconds": 7200,
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    }
  }')

SANDBOX_ID=$(echo $SANDBOX_RESPONSE | jq -r '.sandbox_id')

# Step 2: Use sandbox for task
curl -X POST http://localhost:5000/api/agent/run \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Open browser and navigate to github.com",
    "sandbox_id": "$SANDBOX_ID",
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }'
"""

EXAMPLE4 = r"""# First conversation turn
TASK_RESPONSE=$(curl -X POST http://localhost:5000/api/agent/task/submit \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Open notepad",
    "sandbox_id": "box-abc123",
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }')

TASK_ID=$(echo $TASK_RESPONSE | jq -r '.task_id')

# Wait for completion
sleep 10

# Continue conversation
curl -X POST http://localhost:5000/api/agent/run \
  -H "Content-Type: application/json" \
  -d '{
    "instruction": "Type \"Hello, World!\" in the notepad",
    "sandbox_id": "sbx-abc123",
    "continue_context": true,
    "task_id": "$TASK_ID",
    "authentication": {
      "api_key": "sk-lybic-key",
      "org_id": "org-123"
    },
    "ark_apikey": "ark-api-key"
  }'
"""
