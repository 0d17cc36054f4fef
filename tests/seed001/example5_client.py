# Copied verbatim from seed 001 (/work/shared/seeds/001_bc2661ce686d3907.txt,
# "API Examples > Example 5: Python Client"), not edited or reformatted (excluded from ruff in
# pyproject.toml). tests/seed001/test_seed001_examples.py runs it with only the
# host changed ("http://localhost:5000" -> the dispatcher's HTTP address).
import requests
import json

class LybicAgentClient:
    def __init__(self, base_url="http://localhost:5000"):
        self.base_url = base_url
        
    def run_task(self, instruction, sandbox_id, auth, ark_key):
        """Stream task execution"""
        url = f"{self.base_url}/api/agent/run"
        payload = {
            "instruction": instruction,
            "sandbox_id": sandbox_id,
            "authentication": auth,
            "ark_apikey": ark_key
        }
        
        response = requests.post(url, json=payload, stream=True)
        
        for line in response.iter_lines():
            if line:
                decoded_line = line.decode('utf-8')
                if decoded_line.startswith('data: '):
                    data = json.loads(decoded_line[6:])
                    yield data
    
    def submit_task(self, instruction, sandbox_id, auth, ark_key):
        """Submit async task"""
        url = f"{self.base_url}/api/agent/task/submit"
        payload = {
            "instruction": instruction,
            "sandbox_id": sandbox_id,
            "authentication": auth,
            "ark_apikey": ark_key
        }
        
        response = requests.post(url, json=payload)
        return response.json()
    
    def get_status(self, task_id):
        """Get task status"""
        url = f"{self.base_url}/api/agent/task/status/{task_id}"
        response = requests.get(url)
        return response.json()

# Usage
client = LybicAgentClient()

auth = {
    "api_key": "sk-lybic-key",
    "org_id": "org-123"
}

# Stream execution
for event in client.run_task(
    "Open calculator",
    "box-123",
    auth,
    "ark-key"
):
    print(event)

# Async execution
result = client.submit_task(
    "Create file test.txt",
    "box-123",
    auth,
    "ark-key"
)
task_id = result['task_id']

# Poll status
status = client.get_status(task_id)
print(status)
