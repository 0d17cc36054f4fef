# Copied verbatim from seed 001 (/work/shared/seeds/001_bc2661ce686d3907.txt,
# "Best Practice Example > 4. Client Example with API Keys in Requests"), not edited or reformatted (excluded from ruff in
# pyproject.toml). tests/seed001/test_seed001_examples.py runs it with only the
# host changed ("http://localhost:5000" -> the dispatcher's HTTP address).
import requests
import json
from typing import Generator, Dict

class ProductionLybicClient:
    def __init__(
        self,
        base_url: str = "http://localhost:5000",
        lybic_api_key: str = None,
        lybic_org_id: str = None,
        ark_api_key: str = None
    ):
        self.base_url = base_url
        self.lybic_auth = {
            "api_key": lybic_api_key,
            "org_id": lybic_org_id
        } if lybic_api_key and lybic_org_id else None
        self.ark_api_key = ark_api_key
    
    def create_sandbox(
        self,
        name: str = "production-sandbox",
        shape: str = "beijing-2c-4g-cpu",
        max_life_seconds: int = 7200
    ) -> Dict:
        """Create a new sandbox"""
        url = f"{self.base_url}/api/sandbox/create"
        payload = {
            "name": name,
            "shape": shape,
            "maxLifeSeconds": max_life_seconds,
            "authentication": self.lybic_auth
        }
        
        response = requests.post(url, json=payload)
        response.raise_for_status()
        return response.json()
    
    def run_task_stream(
        self,
        instruction: str,
        sandbox_id: str,
        continue_context: bool = False,
        task_id: str = None
    ) -> Generator[Dict, None, None]:
        """Stream task execution with real-time updates"""
        url = f"{self.base_url}/api/agent/run"
        payload = {
            "instruction": instruction,
            "sandbox_id": sandbox_id,
            "continue_context": continue_context,
            "authentication": self.lybic_auth,
            "ark_apikey": self.ark_api_key
        }
        
        if task_id:
            payload["task_id"] = task_id
        
        response = requests.post(url, json=payload, stream=True)
        response.raise_for_status()
        
        for line in response.iter_lines():
            if line:
                decoded_line = line.decode('utf-8')
                if decoded_line.startswith('data: '):
                    try:
                        data = json.loads(decoded_line[6:])
                        yield data
                    except json.JSONDecodeError:
                        continue
    
    def submit_task_async(
        self,
        instruction: str,
        sandbox_id: str,
        max_steps: int = 50
    ) -> Dict:
        """Submit task for async execution"""
        url = f"{self.base_url}/api/agent/task/submit"
        payload = {
            "instruction": instruction,
            "sandbox_id": sandbox_id,
            "max_steps": max_steps,
            "authentication": self.lybic_auth,
            "ark_apikey": self.ark_api_key
        }
        
        response = requests.post(url, json=payload)
        response.raise_for_status()
        return response.json()
    
    def get_task_status(self, task_id: str) -> Dict:
        """Get task status and results"""
        url = f"{self.base_url}/api/agent/task/status/{task_id}"
        response = requests.get(url)
        response.raise_for_status()
        return response.json()
    
    def cancel_task(self, task_id: str = None):
        """Cancel specific task or all tasks"""
        url = f"{self.base_url}/api/agent/cancel"
        payload = {"authentication": self.lybic_auth}
        
        if task_id:
            payload["task_id"] = task_id
        
        response = requests.post(url, json=payload)
        response.raise_for_status()
        return response.json()


# Usage Example
def main():
    # Initialize client with credentials
    client = ProductionLybicClient(
        base_url="http://localhost:5000",
        lybic_api_key="sk-your-lybic-api-key",
        lybic_org_id="your-lybic-org-id",
        ark_api_key="your-ark-api-key"
    )
    
    # Step 1: Create sandbox
    print("Creating sandbox...")
    sandbox_result = client.create_sandbox(
        name="automation-workspace",
        max_life_seconds=7200
    )
    sandbox_id = sandbox_result['sandbox_id']
    print(f"Sandbox created: {sandbox_id}")
    
    # Step 2: Execute task with streaming
    print("\nExecuting task (streaming)...")
    instruction = "Open browser and search for 'Python best practices'"
    
    for event in client.run_task_stream(instruction, sandbox_id):
        event_type = event.get('type', 'unknown')
        content = event.get('content', '')
        print(f"[{event_type}] {content}")
        
        if event_type == 'finished':
            print(f"\nTask completed: {event.get('output')}")
            break
    
    # Step 3: Continue conversation (context continuation)
    print("\nContinuing conversation...")
    follow_up = "Now click on the first result"
    
    task_result = client.submit_task_async(follow_up, sandbox_id)
    task_id = task_result['task_id']
    print(f"Follow-up task submitted: {task_id}")
    
    # Step 4: Poll for completion
    import time
    while True:
        status = client.get_task_status(task_id)
        print(f"Status: {status['status']}")
        
        if status['status'] in ['finished', 'error', 'cancelled']:
            print(f"Final output: {status.get('finished_output')}")
            break
        
        time.sleep(2)
    
    print("\nAll tasks completed!")


if __name__ == "__main__":
    main()
